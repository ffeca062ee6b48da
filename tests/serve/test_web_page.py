"""The web page: static checks, and a real browser (headless Chromium via Selenium) against the real app.

The browser test starts the OpenAI-compatible API (:func:`medrwr.serve.api.app.create_app`) on a free
loopback port with the tiny random Qwen2.5-VL, a small real BM25 index and the page from the package, loads
the page, asks the first example question and waits for the answer; it checks that the query, a retrieved
document and the answer are on the page, and saves a screenshot (``docs/img/web-page.png`` is one of them).
A random model never writes tags, so a forcing logits processor (``medrwr.testing.ForcedTranscript``)
scripts its turns; the answer letter is the model's own pick (a FREE hole). Everything else is real.
Skips with the install command when chromium, chromedriver or selenium are missing.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

WEB = Path(__file__).resolve().parents[2] / "medrwr" / "serve" / "web"
QUERY = "lobar pneumonia consolidation"
CASE_REPORTS = [
    "Right lower zone airspace opacity; lobar pneumonia confirmed on follow-up.",
    "Clear lungs, normal heart size; no acute abnormality.",
    "Right frontal hyperdense focus in keeping with acute hemorrhage.",
]
DOCS = [
    ("kb-pneu", "Lobar pneumonia", ("Lobar pneumonia shows homogeneous consolidation of a lobe with air "
                                    "bronchograms; fever and productive cough are typical."), "synthetic-kb"),
    ("kb-ptx", "Pneumothorax", "A pneumothorax shows a visceral pleural line with absent lung markings beyond it.",
     "synthetic-kb"),
    ("kb-eff", "Pleural effusion", "A pleural effusion blunts the costophrenic angle and forms a meniscus.",
     "synthetic-kb"),
    ("kb-ich", "Intracerebral hemorrhage", "Acute hemorrhage is hyperdense on non-contrast CT.", "synthetic-kb"),
    ("kb-cons", "Consolidation", "Consolidation: alveolar air replaced by fluid, pus or cells; lobar or segmental.",
     "synthetic-kb"),
]


# ---------------------------------------------------------------- static checks (no browser)


def test_page_files_are_shipped_and_reference_nothing_outside():
    html = (WEB / "index.html").read_text()
    for ref in re.findall(r'(?:src|href)="([^"#][^"]*)"', html):
        if ref.startswith("data:"):
            continue
        assert not re.match(r"[a-z]+://|//", ref), f"index.html loads {ref} from outside the package (no CDN)"
        assert (WEB / ref).is_file(), f"index.html references {ref}, which is not in {WEB}"
    import json

    for ex in json.loads((WEB / "examples.json").read_text()):
        assert (WEB / ex["image"]).is_file() and len(ex["options"]) >= 2, ex
    for name in ("app.js", "style.css"):
        assert not re.search(r"https?://", (WEB / name).read_text()), f"{name} reaches outside the server"


def test_script_never_writes_html_from_strings():
    js = (WEB / "app.js").read_text()
    for sink in (r"\binnerHTML\b", r"\bouterHTML\b", r"\binsertAdjacentHTML\b", r"\bdocument\.write",
                 r"(?<![\w.])eval\(", r"\bnew Function\b"):
        assert not re.search(sink, js), f"app.js uses {sink}: model and document text must go in as text nodes"


# ---------------------------------------------------------------- the real app in a real browser


def _forcing(tok):
    """Turn 1 searches, turn 2 answers; after CDIR drops that answer and inserts the case, the row looks new to
    the forcing processor (its history no longer extends), so it gets the answer-only script."""
    from medrwr.testing import FREE, ForcedTranscript

    letters = [tok.convert_tokens_to_ids(c) for c in "ABCD"]
    answer = ["<think>The documents describe lobar consolidation.</think>\n<answer>", FREE(1, letters), "</answer>"]
    first = [f"<think>A lower-zone opacity with fever.</think>\n<query>{QUERY}</query>", answer]
    again = [["<think>The similar case agrees.</think>\n<answer>", FREE(1, letters), "</answer>"]]
    return ForcedTranscript(tok, choose=lambda prompt: again if "similar medical imaging" in prompt else first)


def _image_index(out: Path) -> Path:
    """A real CDIR image index (pixel-statistics encoder) over the page's synthetic example images."""
    import json

    from medrwr.retrieval.index.images import ImageIndex

    rows = [{"id": "case-" + ex["image"][len("example-"):-len(".png")], "image": ex["image"], "report": CASE_REPORTS[i]}
            for i, ex in enumerate(json.loads((WEB / "examples.json").read_text()))]
    manifest = out.parent / "cases.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ImageIndex.build(manifest, out, images_dir=WEB, encoder="pixel-stats")


@pytest.fixture(scope="module")
def app_url(tiny_vlm_dir, tmp_path_factory, loopback_server):
    from _browser import require_browser

    require_browser()
    pytest.importorskip("torch")
    pytest.importorskip("fastapi")
    try:
        from medrwr.serve.api.app import create_app
    except ImportError as exc:  # the API package not there yet
        pytest.skip(f"the chat API (medrwr.serve.api.app.create_app) is not importable: {exc}")
    from transformers import Qwen2_5_VLForConditionalGeneration

    from medrwr.config import CDIRConfig, RolloutConfig, ServerConfig
    from medrwr.retrieval.index.corpus import Document
    from medrwr.retrieval.index.hybrid import HybridRetriever, build_index
    from medrwr.retrieval.index.images import ImageIndex
    from medrwr.rollout.backends.hf import HFBackend
    from medrwr.rollout.backends.processing import load_processor
    from medrwr.rollout.engine import RolloutEngine

    index = build_index([Document(*d) for d in DOCS], tmp_path_factory.mktemp("web") / "index", dense=False,
                        show_progress=False)
    retriever = HybridRetriever.load(index)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_vlm_dir).eval()
    proc = load_processor(tiny_vlm_dir)
    backend = HFBackend(model, proc, logits_processors=[_forcing(proc.tokenizer)], seed=0)
    image_index = ImageIndex.load(_image_index(tmp_path_factory.mktemp("web") / "images"))
    engine = RolloutEngine(backend, retriever, RolloutConfig(max_new_tokens_per_turn=64), k=2,
                           image_retriever=image_index, cdir=CDIRConfig(enabled=False, threshold=0.99))
    app = create_app(engine, ServerConfig(), model_name="medrwr-tiny-vlm")
    with loopback_server(app) as server:
        yield server.url
    retriever.close()


@pytest.fixture()
def browser():
    from _browser import chrome

    driver = chrome()
    yield driver
    driver.quit()


def test_page_asks_and_shows_query_documents_and_answer(app_url, browser, tmp_path):
    from _browser import console_errors, full_page_screenshot
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    d.get(app_url + "/")
    wait = WebDriverWait(d, 30)
    # The first example fills the form and the page learns the model from /v1/models.
    wait.until(lambda d: d.find_element(By.ID, "question").get_attribute("value"))
    wait.until(lambda d: "medrwr-tiny-vlm" in d.find_element(By.ID, "server-status").text)
    assert len(d.find_elements(By.CSS_SELECTOR, "#option-list input")) == 4
    d.find_element(By.ID, "cdir").click()  # consult the most similar case: the tiny model is never confident
    d.find_element(By.ID, "submit").click()
    WebDriverWait(d, 90).until(lambda d: d.find_element(By.ID, "run-status").text in ("Done.", "Failed.", "Stopped."))
    alert = d.find_element(By.ID, "alert")
    assert not alert.is_displayed(), alert.text
    # The query the model wrote, with the documents the real index returned for it.
    assert [q.text.strip() for q in d.find_elements(By.CSS_SELECTOR, ".query-words")] == [QUERY]
    titles = [t.text for t in d.find_elements(By.CSS_SELECTOR, ".hit-title")]
    assert "Lobar pneumonia" in titles, titles
    first = d.find_element(By.CSS_SELECTOR, "details.hit")
    first.find_element(By.TAG_NAME, "summary").click()
    assert "consolidation" in first.find_element(By.CSS_SELECTOR, ".hit-text").text
    # The answer: one of the four letters, its confidence, and one bar per option.
    letter = d.find_element(By.CSS_SELECTOR, ".answer-letter").text
    assert letter in "ABCD" and len(letter) == 1
    assert re.search(r"Confidence \d+\.\d%", d.find_element(By.CSS_SELECTOR, ".confidence").text)
    assert len(d.find_elements(By.CSS_SELECTOR, ".bar-row")) == 4
    assert d.find_element(By.CSS_SELECTOR, ".bar-row.chosen .bar-label").text.startswith(letter + ".")
    # CDIR: the closest case of the real image index is the example image itself, shown with its report.
    case = d.find_element(By.CSS_SELECTOR, ".step-cdir")
    assert "case-chest" in case.find_element(By.CSS_SELECTOR, ".case-id").text
    assert case.find_element(By.CSS_SELECTOR, ".case-report").text == CASE_REPORTS[0]
    assert case.find_element(By.CSS_SELECTOR, "img").get_attribute("src").startswith("data:image/")
    assert "Answer after the case:" in case.text
    # In the order it happened: the case card sits after the first answer, before the reasoning that followed.
    steps = [li.get_attribute("class").split()[-1][len("step-"):]
             for li in d.find_elements(By.CSS_SELECTOR, "#timeline > li") if li.is_displayed()]
    assert steps == ["think", "query", "think", "cdir", "think", "answer"], steps
    assert "First answer:" in d.find_elements(By.CSS_SELECTOR, "#timeline > li")[2].text
    assert console_errors(d) == []
    shot = full_page_screenshot(d, tmp_path / "web-page.png")
    assert shot.stat().st_size > 10_000
    docs_img = Path(__file__).resolve().parents[2] / "docs" / "img" / "web-page.png"
    if not docs_img.exists():  # written once for docs/web-page.md; delete it to refresh
        docs_img.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, docs_img)


def test_page_shows_api_errors_in_an_alert(app_url, browser):
    """A request the API refuses (an option left empty is caught by the page; a bad key by the server)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    d.get(app_url + "/")
    wait = WebDriverWait(d, 30)
    wait.until(lambda d: d.find_element(By.ID, "question").get_attribute("value"))
    unlabelled = d.execute_script(
        "return [...document.querySelectorAll('input, select, textarea, button')]"
        ".filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())"
        ".map(e => e.id || e.outerHTML.slice(0, 60));")
    assert unlabelled == [], f"form controls without a label: {unlabelled}"
    # An empty option: the page says which one, before any request.
    d.find_element(By.ID, "add-option").click()
    d.find_element(By.ID, "question").send_keys(Keys.CONTROL, Keys.ENTER)
    alert = wait.until(lambda d: d.find_element(By.ID, "alert") if d.find_element(By.ID, "alert").is_displayed()
                       else None)
    assert "Option E is empty" in alert.text
    # Remove it with the keyboard: its remove button, then Ctrl+Enter sends a request the server refuses
    # (more tokens than the server allows), shown with the server's message.
    d.find_element(By.CSS_SELECTOR, "#option-list li:last-child button").send_keys(Keys.ENTER)
    assert len(d.find_elements(By.CSS_SELECTOR, "#option-list input")) == 4
    d.find_element(By.CSS_SELECTOR, ".settings summary").click()
    d.find_element(By.ID, "max-tokens").send_keys("99999999")
    d.find_element(By.ID, "question").send_keys(Keys.CONTROL, Keys.ENTER)
    wait.until(lambda d: "HTTP 400" in d.find_element(By.ID, "alert").text)
    assert "max_tokens" in d.find_element(By.ID, "alert").text


def test_page_uploads_a_dicom_that_the_server_decodes(app_url, browser, tmp_path):
    """An uploaded DICOM goes to the API as a data:application/dicom URL and the rollout runs on it; a file that
    is no image is refused by the page with a message."""
    from _browser import console_errors
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    pydicom_data = pytest.importorskip("pydicom.data")
    d = browser
    d.get(app_url + "/")
    wait = WebDriverWait(d, 30)
    wait.until(lambda d: d.find_element(By.ID, "question").get_attribute("value"))
    not_image = tmp_path / "notes.txt"
    not_image.write_text("not an image")
    d.find_element(By.ID, "upload").send_keys(str(not_image))
    wait.until(lambda d: d.find_element(By.ID, "alert").is_displayed())
    assert "notes.txt is not a PNG, JPEG or DICOM file" in d.find_element(By.ID, "alert").text
    d.find_element(By.ID, "upload").send_keys(pydicom_data.get_testdata_file("CT_small.dcm"))
    wait.until(lambda d: "DICOM" in d.find_element(By.ID, "preview-caption").text)
    assert not d.find_element(By.ID, "alert").is_displayed()
    assert d.execute_script("return document.querySelectorAll('input[name=example]:checked').length") == 0
    d.find_element(By.ID, "submit").click()
    WebDriverWait(d, 90).until(lambda d: d.find_element(By.ID, "run-status").text in ("Done.", "Failed.", "Stopped."))
    assert not d.find_element(By.ID, "alert").is_displayed(), d.find_element(By.ID, "alert").text
    assert d.find_element(By.CSS_SELECTOR, ".answer-letter").text in ("A", "B", "C", "D")
    assert [q.text for q in d.find_elements(By.CSS_SELECTOR, ".query-words")] == [QUERY]
    assert console_errors(d) == []


@pytest.fixture(scope="module")
def text_only_url(tiny_lm_dir, tmp_path_factory, loopback_server):
    """The app over a text-only policy (as ``medrwr demo``'s default SmolLM2 is) and no image index."""
    from _browser import require_browser

    require_browser()
    pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from medrwr.config import RolloutConfig, ServerConfig
    from medrwr.retrieval.index.corpus import Document
    from medrwr.retrieval.index.hybrid import HybridRetriever, build_index
    from medrwr.rollout.backends.hf import HFBackend
    from medrwr.rollout.backends.processing import load_tokenizer
    from medrwr.rollout.engine import RolloutEngine
    from medrwr.serve.api.app import create_app

    index = build_index([Document(*d) for d in DOCS], tmp_path_factory.mktemp("web-text") / "index", dense=False,
                        show_progress=False)
    retriever = HybridRetriever.load(index)
    tok = load_tokenizer(tiny_lm_dir)
    backend = HFBackend(AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval(), tok,
                        logits_processors=[_forcing(tok)], seed=0)
    engine = RolloutEngine(backend, retriever, RolloutConfig(max_new_tokens_per_turn=64), k=2)
    with loopback_server(create_app(engine, ServerConfig(), model_name="medrwr-tiny-lm")) as server:
        yield server.url
    retriever.close()


def test_page_on_a_text_only_server_sends_no_image_and_turns_cdir_off(text_only_url, browser):
    from _browser import console_errors
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    d.get(text_only_url + "/")
    wait = WebDriverWait(d, 30)
    wait.until(lambda d: d.find_element(By.ID, "capability-note").is_displayed())
    assert "reads text only" in d.find_element(By.ID, "capability-note").text
    cdir = d.find_element(By.ID, "cdir")
    assert not cdir.is_enabled() and not cdir.is_selected()
    wait.until(lambda d: d.find_element(By.ID, "question").get_attribute("value"))
    d.find_element(By.ID, "submit").click()  # an example image is selected, but is not sent: no 400
    WebDriverWait(d, 90).until(lambda d: d.find_element(By.ID, "run-status").text in ("Done.", "Failed.", "Stopped."))
    assert not d.find_element(By.ID, "alert").is_displayed(), d.find_element(By.ID, "alert").text
    assert [q.text for q in d.find_elements(By.CSS_SELECTOR, ".query-words")] == [QUERY]
    assert d.find_element(By.CSS_SELECTOR, ".answer-letter").text in ("A", "B", "C", "D")
    assert console_errors(d) == []
