"""Every error MedRwR raises on purpose, in one tree (as httpx's ``_exceptions.py`` draws its own).

Each class also keeps the builtin base it had before the tree existed (``ConfigError`` is still a
``ValueError``), so ``except ValueError`` in user code keeps working. The CLI catches
:class:`MedRwRError` and prints its message on one line, exit code ``exit_code``.

::

    MedRwRError                         root; ``exit_code`` is what the CLI exits with (1 unless noted)
     ├── ConfigError (ValueError)       a config file or override is wrong: key, value, source
     ├── MissingExtraError (ImportError)  an optional dependency is absent; names the extra (exit 3)
     │    └── KnowledgeBaseError        a knowledge-source package for the default KB is absent
     │         └── VocabularyError      a vocabulary package (HPO, MeSH, ICD-10-CM, drugs) is absent
     ├── InputError (ValueError)        a query, k, batch or question breaks the shared limits
     │    │                             (medrwr.retrieval.limits); carries ``code``, ``param`` (exit 2)
     │    └── InputTypeError (TypeError)  the argument has the wrong type (a string, not a list)
     ├── CorpusError (ValueError)       a corpus file cannot be read as documents
     ├── DatasetError (ValueError)      a benchmark path is missing or has the wrong shape; names the layout (exit 2)
     ├── SynthesisError (ValueError)    a data-synthesis input (pairs, images, LLM endpoint, stage file) is unusable
 ├── TrainingDataError (ValueError) a training dataset file has the wrong shape (file, row, column)
     ├── IndexStoreError (ValueError)   an index directory is unusable
     │    ├── IndexMissing              it or its manifest does not exist
     │    ├── IndexCorrupt              a file is missing or fails its checksum
     │    └── IndexVersionMismatch      written by an incompatible format version
     ├── EncoderError (ValueError)      a text encoder cannot be loaded
     ├── ImageIndexError (ValueError)   an image, image manifest or image index is unusable
     │    └── ImageLoadError            an image cannot be opened or decoded
     ├── RetrievalError (RuntimeError)  a search failed at run time; carries ``queries``
     │    ├── RetrievalUnavailable      the backend cannot be reached (server down, index missing)
     │    ├── RetrievalTimeout          the backend did not answer in time
     │    ├── BadRetrievalResponse      the backend answered something unusable
     │    └── RetrievalRequestError     the server answered 4xx (bad request or API key)
     ├── ServiceError                  the retrieval / API service cannot start
     │    └── PortInUse (OSError)       the requested host:port is taken
     ├── BackendError (RuntimeError)    a policy backend cannot do what was asked
     │    ├── HubUnreachable            a hub id cannot be fetched (offline or no network) nor found in the cache
     │    └── ConstraintError           constrained decoding cannot run (grammar rejected, slow tokenizer, …)
     ├── RolloutDriftError (AssertionError)  token ids drifted between turns: always a bug in MedRwR
     ├── EvalRunError                  an evaluation run cannot go on (changed config, no model for a mode)
     │    └── ResultsCorrupt (ValueError)  a line of results.jsonl cannot be read (file, line, what to do)
     └── CLIError                       a user-facing command failure (``exit_code`` set per case)

HTTP-level errors of the services (``APIError``) are answers, not exceptions that leave a server, and
are documented with the service.
"""

from __future__ import annotations

from collections.abc import Sequence


class MedRwRError(Exception):
    """Root of every deliberate MedRwR error; the message says what is wrong and what to do."""

    exit_code: int = 1


class ConfigError(MedRwRError, ValueError):
    """A config file or override is wrong; the message names the key, the value and the source."""

    exit_code = 2


class MissingExtraError(MedRwRError, ImportError):
    """An optional dependency is not installed; the message names the extra that provides it."""

    exit_code = 3


class KnowledgeBaseError(MissingExtraError):
    """A knowledge source package is missing; the message names the package to install."""


class VocabularyError(KnowledgeBaseError):
    """A vocabulary package that :mod:`medrwr.vocab` reads is not installed; names the package."""


class InputError(MedRwRError, ValueError):
    """User input breaks a limit of :mod:`medrwr.retrieval.limits`: an empty or long query, ``k`` out of
    range, too many queries, an empty or long question. ``code`` and ``param`` are what the server
    answers in its 400 body; checked before any model or index loads."""

    exit_code = 2

    def __init__(self, message: str, code: str = "invalid_input", param: str | None = None):
        super().__init__(message)
        self.code = code
        self.param = param


class InputTypeError(InputError, TypeError):
    """An argument has the wrong type (one string instead of a list, a number instead of a query)."""


class CorpusError(MedRwRError, ValueError):
    """A corpus file cannot be read as documents; the message names the file, the line and the fix."""


class TrainingDataError(MedRwRError, ValueError):
    """A training dataset (MedQA, MedMCQA, MCQ JSONL/parquet) has the wrong shape; names file, row and column."""


class DatasetError(MedRwRError, ValueError):
    """A benchmark's local files are missing or have the wrong shape; the message names the expected layout and
    where to get the data (raised by ``medrwr.eval.datasets.load`` before any item is read)."""

    exit_code = 2


class SynthesisError(MedRwRError, ValueError):
    """``medrwr data synth`` / ``medrwr kb from-explanations`` cannot go on: a pairs file, image folder, LLM
    endpoint or stage file is unusable; the message names it and what to do."""


class IndexStoreError(MedRwRError, ValueError):
    """Base of index-directory problems; the message says what is wrong and what to do."""


class IndexMissing(IndexStoreError):
    """The index directory or its manifest does not exist."""


class IndexCorrupt(IndexStoreError):
    """The manifest cannot be read, or a file is missing or does not match its checksum."""


class IndexVersionMismatch(IndexStoreError):
    """The index was written by an incompatible format version."""


class EncoderError(MedRwRError, ValueError):
    """A text encoder cannot be loaded; the message names the spec and what to do."""


class ImageIndexError(MedRwRError, ValueError):
    """An image, a manifest or an image index is unusable; the message says which and what to do."""


class ImageLoadError(ImageIndexError):
    """An image cannot be opened or decoded."""


class RetrievalError(MedRwRError, RuntimeError):
    """Base of run-time retrieval failures. Carries the query batch that failed.

    Callers such as the rollout engine record these on the trace instead of crashing.
    """

    def __init__(self, message: str, queries: Sequence[str] | None = None):
        super().__init__(message)
        self.queries = list(queries or [])


class RetrievalUnavailable(RetrievalError):
    """The backend cannot be reached (server down, index missing)."""


class RetrievalTimeout(RetrievalError):
    """The backend did not answer in time."""


class BadRetrievalResponse(RetrievalError):
    """The backend answered something we cannot use."""


class RetrievalRequestError(RetrievalError):
    """The server answered 4xx: the request itself is wrong (or the API key is)."""

    def __init__(
        self, message: str, queries: Sequence[str] | None = None, status: int = 400, code: str | None = None
    ):
        super().__init__(message, queries)
        self.status = status
        self.code = code


class ServiceError(MedRwRError):
    """A service (retrieval server, API) cannot start; the message says why."""


class PortInUse(ServiceError, OSError):
    """The requested host:port is taken."""


class BackendError(MedRwRError, RuntimeError):
    """The backend cannot do what was asked (bad input, missing capability); the message says what to do."""


class HubUnreachable(BackendError):
    """A model hub id cannot be fetched (``HF_HUB_OFFLINE`` set, or the Hub unreachable) and is not in the local
    Hugging Face cache; raised once, before any retries, naming the id and saying to pass a local path."""

    def __init__(self, message: str, model_id: str = ""):
        super().__init__(message)
        self.model_id = model_id


class ConstraintError(BackendError):
    """Grammar-constrained decoding (``rollout.constrain``) cannot run: the grammar library rejected the
    grammar, the tokenizer is not a fast one, or the backend cannot constrain; the message says what to set."""


class RolloutDriftError(MedRwRError, AssertionError):
    """The ids fed to a turn do not extend the previous turn's ids exactly. Always a bug in our code."""


class EvalRunError(MedRwRError):
    """An evaluation run cannot start or resume (``medrwr eval run``): the run directory was made with another
    configuration, or a mode needs what the policy lacks; the message says what to change."""


class ResultsCorrupt(EvalRunError, ValueError):
    """A line of ``RUN_DIR/results.jsonl`` cannot be read and is not the torn last write of an interrupted run;
    the message names the file and line."""


class CLIError(MedRwRError):
    """A user-facing command failure: printed without a traceback, exit code ``code`` (default 1)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code
        self.exit_code = code


__all__ = [
    "BackendError",
    "BadRetrievalResponse",
    "CLIError",
    "ConfigError",
    "ConstraintError",
    "CorpusError",
    "DatasetError",
    "EncoderError",
    "EvalRunError",
    "HubUnreachable",
    "ImageIndexError",
    "ImageLoadError",
    "IndexCorrupt",
    "IndexMissing",
    "IndexStoreError",
    "IndexVersionMismatch",
    "InputError",
    "InputTypeError",
    "KnowledgeBaseError",
    "MedRwRError",
    "MissingExtraError",
    "PortInUse",
    "RetrievalError",
    "RetrievalRequestError",
    "ResultsCorrupt",
    "RetrievalTimeout",
    "RetrievalUnavailable",
    "RolloutDriftError",
    "TrainingDataError",
    "ServiceError",
    "VocabularyError",
]
