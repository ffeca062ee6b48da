"""BM25 against a hand-written BM25, RRF on hand-computed ranks, dense encoding, and every search mode
on a small real index (packaged MiniLM, real bm25s, real FAISS)."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from medrwr.config import RetrievalConfig
from medrwr.retrieval.base import Hit, Retriever
from medrwr.retrieval.index.bm25 import BM25Index
from medrwr.retrieval.index.corpus import Document
from medrwr.retrieval.index.hybrid import HybridRetriever, build_index, rrf_fuse

FACTS = [
    (
        "Myocardial infarction",
        "Necrosis of heart muscle caused by occlusion of a coronary artery; presents with crushing chest pain radiating to the left arm.",
    ),
    (
        "Angina pectoris",
        "Chest discomfort from transient myocardial ischemia, relieved by rest or nitroglycerin.",
    ),
    ("Asthma", "Chronic inflammatory airway disease with reversible bronchoconstriction, wheeze and cough."),
    ("COPD", "Chronic obstructive pulmonary disease: persistent airflow limitation, usually from smoking."),
    (
        "Pneumonia",
        "Infection of the lung parenchyma with fever, productive cough and consolidation on chest X-ray.",
    ),
    (
        "Pneumothorax",
        "Air in the pleural space; chest radiograph shows a visceral pleural line and absent lung markings.",
    ),
    (
        "Pulmonary embolism",
        "Thrombus lodged in the pulmonary arteries; sudden dyspnea, pleuritic pain, tachycardia.",
    ),
    ("Pleural effusion", "Fluid in the pleural cavity; blunting of the costophrenic angle on radiographs."),
    ("Cardiomegaly", "Enlarged cardiac silhouette with a cardiothoracic ratio above 0.5 on a PA chest film."),
    ("Heart failure", "The heart cannot pump enough blood; edema, orthopnea and elevated BNP."),
    (
        "Atrial fibrillation",
        "Irregularly irregular rhythm without P waves; risk of stroke, treated with anticoagulation.",
    ),
    ("Hypertension", "Persistently raised arterial blood pressure, a major risk factor for stroke."),
    (
        "Ischemic stroke",
        "Sudden focal neurological deficit from an occluded cerebral artery; treat with thrombolysis.",
    ),
    ("Migraine", "Recurrent unilateral throbbing headache with photophobia, nausea and sometimes aura."),
    (
        "Meningitis",
        "Inflammation of the meninges; fever, neck stiffness and headache; lumbar puncture confirms.",
    ),
    ("Epilepsy", "Recurrent unprovoked seizures caused by abnormal neuronal discharges."),
    ("Type 1 diabetes", "Autoimmune destruction of pancreatic beta cells causing insulin deficiency."),
    ("Type 2 diabetes", "Insulin resistance with hyperglycemia; first-line therapy is metformin."),
    ("Hypothyroidism", "Low thyroid hormone: fatigue, weight gain, cold intolerance, raised TSH."),
    ("Hyperthyroidism", "Excess thyroid hormone: weight loss, tremor, heat intolerance, low TSH."),
    (
        "Appendicitis",
        "Inflammation of the appendix with periumbilical pain migrating to the right lower quadrant.",
    ),
    ("Cholecystitis", "Inflammation of the gallbladder with right upper quadrant pain and Murphy sign."),
    (
        "Pancreatitis",
        "Epigastric pain radiating to the back with raised lipase, often from gallstones or alcohol.",
    ),
    ("Cirrhosis", "End-stage liver fibrosis with ascites, varices and jaundice."),
    ("Hepatitis B", "Viral liver infection transmitted by blood and sexual contact; vaccine available."),
    ("Celiac disease", "Gluten-sensitive enteropathy with villous atrophy and malabsorption."),
    ("Crohn disease", "Transmural granulomatous inflammation anywhere in the gut, skip lesions."),
    ("Kidney stones", "Nephrolithiasis causes colicky flank pain radiating to the groin and hematuria."),
    ("Urinary tract infection", "Dysuria, frequency and urgency; Escherichia coli is the usual organism."),
    ("Acute kidney injury", "Rapid fall in glomerular filtration with rising creatinine."),
    ("Iron deficiency anemia", "Microcytic hypochromic anemia with low ferritin, often from blood loss."),
    ("Sickle cell disease", "Hemoglobin S polymerises, causing vaso-occlusive crises and hemolysis."),
    ("Leukemia", "Malignant proliferation of white blood cells in the bone marrow."),
    ("Osteoporosis", "Reduced bone mineral density with fragility fractures; measured by DEXA."),
    ("Rheumatoid arthritis", "Symmetric inflammatory polyarthritis of small joints with morning stiffness."),
    ("Gout", "Monosodium urate crystal arthritis, classically of the first metatarsophalangeal joint."),
    ("Osteoarthritis", "Degenerative joint disease with cartilage loss and osteophytes."),
    ("Psoriasis", "Chronic skin disease with silvery scaly plaques on extensor surfaces."),
    ("Melanoma", "Malignant tumour of melanocytes; asymmetric pigmented lesion with irregular borders."),
    ("Glaucoma", "Optic neuropathy usually with raised intraocular pressure and visual field loss."),
    ("Cataract", "Opacification of the eye lens causing painless gradual blurred vision."),
    ("Diabetic retinopathy", "Microaneurysms, hemorrhages and neovascularisation of the retina in diabetes."),
    ("Tuberculosis", "Mycobacterium tuberculosis infection; cavitary upper lobe lesions, night sweats."),
    ("HIV infection", "Retrovirus depleting CD4 T cells; treated with antiretroviral therapy."),
    ("Malaria", "Plasmodium infection transmitted by Anopheles mosquitoes; cyclic fevers."),
    ("Sepsis", "Life-threatening organ dysfunction caused by a dysregulated response to infection."),
    (
        "Anaphylaxis",
        "Severe allergic reaction with hypotension and airway swelling; give intramuscular epinephrine.",
    ),
    ("Depression", "Persistent low mood and anhedonia for at least two weeks."),
    ("Schizophrenia", "Psychotic disorder with hallucinations, delusions and disorganised thinking."),
    ("Alzheimer disease", "Progressive dementia with amyloid plaques and neurofibrillary tangles."),
    ("Parkinson disease", "Resting tremor, rigidity and bradykinesia from loss of dopaminergic neurons."),
    ("Multiple sclerosis", "Demyelinating disease of the central nervous system with relapses."),
    (
        "Aortic dissection",
        "Tear in the aortic intima; tearing chest pain radiating to the back, widened mediastinum.",
    ),
    ("Deep vein thrombosis", "Clot in a deep leg vein; swollen painful calf; may embolise to the lung."),
    (
        "Fracture of the femoral neck",
        "Hip fracture in elderly patients after a fall; shortened externally rotated leg.",
    ),
]


def _docs() -> list[Document]:
    docs = [Document(f"d{i:02d}", t, x, "toy-kb") for i, (t, x) in enumerate(FACTS)]
    # duplicates for de-duplication: same text under a new id, and an existing id reused with new text
    docs.append(Document("dup-mi", "Myocardial infarction (copy)", FACTS[0][1], "mirror"))
    docs.append(
        Document("d02", "Asthma again", "Asthma exacerbations are treated with inhaled salbutamol.", "toy-kb")
    )
    return docs


@pytest.fixture(scope="session")
def encoder():
    from medrwr.retrieval.encoders.text import load_text_encoder

    return load_text_encoder("default", device="cpu")


@pytest.fixture(scope="session")
def index_dir(tmp_path_factory, encoder) -> Path:
    out = tmp_path_factory.mktemp("core") / "toy-index"
    return build_index(_docs(), out, RetrievalConfig(device="cpu"), encoder=encoder, show_progress=False)


@pytest.fixture(scope="session")
def retriever(index_dir) -> HybridRetriever:
    return HybridRetriever.load(index_dir)


# ------------------------------------------------------------------------------------------ RRF


def test_rrf_matches_hand_computed_scores():
    fused = rrf_fuse([["a", "b", "c"], ["c", "a", "d"]], weights=[1.0, 2.0], k=60)
    expected = {"a": 1 / 61 + 2 / 62, "b": 1 / 62, "c": 1 / 63 + 2 / 61, "d": 2 / 63}
    assert dict(fused) == pytest.approx(expected, abs=1e-15)
    assert [d for d, _ in fused] == sorted(expected, key=lambda d: -expected[d])  # c, a, d, b
    assert [d for d, _ in fused] == ["c", "a", "d", "b"]


def test_rrf_ties_are_stable_and_duplicates_count_once():
    # x and y tie exactly; x was seen first
    assert [d for d, _ in rrf_fuse([["x", "y"], ["y", "x"]], k=10)] == ["x", "y"]
    assert rrf_fuse([["z", "z", "w"]], k=0) == [("z", 1.0), ("w", 1 / 3)]
    assert rrf_fuse([[], ["q"]], weights=[5, 0.5], k=1) == [("q", 0.25)]
    with pytest.raises(ValueError, match="2 rankings but 1 weights"):
        rrf_fuse([["a"], ["b"]], weights=[1.0])


# ------------------------------------------------------------------------------------------ BM25


def _hand_bm25(corpus_tokens: list[list[str]], query: list[str], k1: float, b: float) -> np.ndarray:
    """Lucene BM25 written out independently: idf = ln(1 + (N - df + .5)/(df + .5))."""
    n = len(corpus_tokens)
    avgdl = sum(map(len, corpus_tokens)) / n
    df = Counter(t for doc in corpus_tokens for t in set(doc))
    out = np.zeros(n)
    for j, doc in enumerate(corpus_tokens):
        tf = Counter(doc)
        for t in set(query):
            if t not in tf:
                continue
            idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
            out[j] += idf * tf[t] / (tf[t] + k1 * (1 - b + b * len(doc) / avgdl))
    return out


@pytest.mark.parametrize("k1,b", [(1.5, 0.75), (0.9, 0.4)])
def test_bm25_matches_independent_implementation(k1, b):
    texts = [t + " " + x for t, x in FACTS]
    split = [re.findall(r"\w\w+", t.lower()) for t in texts]  # bm25s's token pattern, no stemming/stopwords
    ix = BM25Index(k1=k1, b=b, stemmer=None, stopwords=None).index(texts)
    queries = ["chest pain radiating to the arm", "fever and cough", "thyroid hormone", "pain"]
    for use_bm25s in (False, True):  # our one-product batch scorer, and bm25s's own retrieve
        ix.use_bm25s_retrieve = use_bm25s
        ids, scores = ix.search(queries, k=len(texts))
        for qi, q in enumerate(queries):
            hand = _hand_bm25(split, re.findall(r"\w\w+", q.lower()), k1, b)
            found = ids[qi] >= 0
            assert set(ids[qi][found].tolist()) == set(
                np.flatnonzero(hand > 0).tolist()
            )  # exactly the matches
            assert (scores[qi][~found] == 0).all()
            np.testing.assert_allclose(scores[qi][found], hand[ids[qi][found]], rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(scores[qi][found], np.sort(hand[hand > 0])[::-1], rtol=1e-5, atol=1e-6)
            assert hand[ids[qi][0]] == hand.max() > 0


def test_bm25_stemming_and_stopwords_are_configurable():
    texts = ["the runner was running", "a quiet library", "the the the"]
    stemmed = BM25Index(stemmer="english", stopwords="en").index(texts)
    plain = BM25Index(stemmer=None, stopwords=None).index(texts)
    ids, scores = stemmed.search(["runs"], k=3)
    assert ids[0][0] == 0 and scores[0][0] > 0  # runs -> run matches running
    _, scores = plain.search(["runs"], k=3)
    assert scores[0].max() == 0
    _, scores = stemmed.search(["the"], k=3)  # stopword removed: nothing matches
    assert scores[0].max() == 0
    ids, scores = plain.search(["the"], k=3)
    assert ids[0][0] == 2 and scores[0][0] > 0
    with pytest.raises(ValueError, match="unknown stemmer language"):
        BM25Index(stemmer="klingon")


def test_bm25_batched_equals_single_and_k_is_clipped(tmp_path):
    texts = [x for _, x in FACTS]
    ix = BM25Index().index(texts)
    qs = ["chest pain", "insulin", "zzzz unknown", ""]
    ids, scores = ix.search(qs, k=5)
    assert ids.shape == scores.shape == (4, 5) and ids.dtype == np.int64
    for i, q in enumerate(qs):
        i1, s1 = ix.search([q], k=5)
        np.testing.assert_allclose(s1[0], scores[i])
        if scores[i][0] > 0:
            assert i1[0][0] == ids[i][0]
    assert (scores[2] == 0).all() and (scores[3] == 0).all() and (ids[2] == -1).all() and (ids[3] == -1).all()
    ids, _ = ix.search(["pain"], k=10_000)
    assert ids.shape == (1, len(texts))
    # the one-product batch scorer gives bm25s's own scores (stemming + stopwords on, repeated terms)
    more = ["Chest pains radiating to the arms", "sugar sugar insulin", "the of and", "stroke risk"]
    fast = ix.search(more, k=8)
    ix.use_bm25s_retrieve = True
    slow = ix.search(more, k=8)
    ix.use_bm25s_retrieve = False
    np.testing.assert_allclose(fast[1], slow[1], rtol=1e-6)
    np.testing.assert_array_equal(fast[0] >= 0, slow[0] >= 0)
    ix.save(tmp_path / "bm25")
    assert not list((tmp_path / "bm25").rglob("*.pkl"))
    for f in (tmp_path / "bm25").glob("*.npy"):
        np.load(f, allow_pickle=False)
    again = BM25Index.load(tmp_path / "bm25")
    i2, s2 = again.search(qs, k=5)
    np.testing.assert_array_equal(s2, ix.search(qs, k=5)[1])
    assert again.stemmer_name == "english" and again.n_docs == len(texts)


# ------------------------------------------------------------------------------------------ dense


def test_packaged_encoder_is_normalised_and_offline(encoder):
    from medrwr.assets import minilm_dir

    assert minilm_dir().joinpath("model.safetensors").is_file()
    v = encoder.encode(["chest pain", "heart attack", "fractured femur"])
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert encoder.encode([]).shape == (0, 384)


def test_unknown_encoder_offline_is_a_clear_error():
    from medrwr.errors import EncoderError
    from medrwr.retrieval.encoders.text import load_text_encoder

    with pytest.raises(EncoderError, match=r"'nobody/no-such-encoder'.*network"):
        load_text_encoder("nobody/no-such-encoder")
    with pytest.raises(EncoderError, match="does not exist"):
        load_text_encoder("./no/such/folder")


def test_encode_to_memmap(tmp_path, encoder):
    from medrwr.retrieval.encoders.text import encode_to_memmap

    texts = [f"{t}. {x}" for t, x in FACTS[:20]]
    path = tmp_path / "emb.npy"
    arr = encode_to_memmap(encoder, iter(texts), len(texts), path, batch_size=4, show_progress=False)
    assert isinstance(arr, np.memmap)
    loaded = np.load(path, allow_pickle=False, mmap_mode="r")
    assert loaded.shape == (20, 384)
    np.testing.assert_allclose(loaded, encoder.encode(texts), atol=1e-5)
    with pytest.raises(ValueError, match="expected 21 texts, got 20"):
        encode_to_memmap(encoder, iter(texts), 21, tmp_path / "x.npy", show_progress=False)
    with pytest.raises(ValueError, match="more than n=19"):
        encode_to_memmap(encoder, iter(texts), 19, tmp_path / "y.npy", show_progress=False)


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_faiss_kinds_agree_on_a_small_corpus(tmp_path, encoder, kind):
    from medrwr.retrieval.index.dense import DenseIndex

    vecs = encoder.encode([x for _, x in FACTS])
    q = encoder.encode(["heart attack", "sugar and insulin"])
    exact = vecs @ q.T
    ix = DenseIndex(384, kind, nlist=4, nprobe=4, m=8).build(vecs)
    scores, ids = ix.search(q, 3)
    assert ids.shape == (2, 3)
    for i in range(2):
        assert ids[i][0] == int(np.argmax(exact[:, i]))
        np.testing.assert_allclose(scores[i][0], exact[:, i].max(), atol=1e-5)
    ix.save(tmp_path)
    again = DenseIndex.load(tmp_path)
    np.testing.assert_array_equal(again.search(q, 3)[1], ids)
    assert again.kind == kind


# ------------------------------------------------------------------------------------------ hybrid


def test_retriever_protocol_and_metadata(retriever):
    assert isinstance(retriever, Retriever)
    assert retriever.doc_count == len(FACTS) + 2
    assert retriever.modes == ("bm25", "dense", "hybrid")
    m = retriever.manifest
    assert m["encoder"]["name"] == "all-MiniLM-L6-v2" and m["encoder"]["dim"] == 384
    assert m["corpus"]["sources"] == {"toy-kb": len(FACTS) + 1, "mirror": 1}


@pytest.mark.parametrize("mode", ["bm25", "dense", "hybrid"])
def test_each_mode_returns_ranked_hits(retriever, mode):
    results = retriever.search(
        ["crushing chest pain radiating to the left arm", "gluten enteropathy"], k=4, mode=mode
    )
    assert len(results) == 2
    for hits in results:
        assert 1 <= len(hits) <= 4 and all(isinstance(h, Hit) for h in hits)
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
        assert all(h.source in ("toy-kb", "mirror") for h in hits)
    assert results[0][0].title.startswith("Myocardial infarction")
    assert results[1][0].title == "Celiac disease"


def test_dense_finds_paraphrases_bm25_cannot(retriever):
    # no word of the query occurs in the MI passage; the encoder knows "heart attack"
    dense = retriever.search(["heart attack"], k=3, mode="dense")[0]
    assert any(h.title.startswith("Myocardial infarction") for h in dense)
    assert retriever.search(["sugar sugar"], k=3, mode="bm25") == [[]]  # no lexical match at all


def test_hybrid_is_rrf_of_the_two_rankings(retriever):
    q = ["sudden shortness of breath and pleuritic pain"]
    depth = retriever.config.fusion_depth
    ids, scores = retriever.bm25.search(q, depth)  # the two engines, asked directly
    sparse = ids[0][scores[0] > 0].tolist()
    dense = retriever.dense.search(retriever.encoder.encode_queries(q), depth)[1][0].tolist()
    fused = rrf_fuse([sparse, dense], k=retriever.config.rrf_k)
    hits = retriever.search(q, k=3, mode="hybrid")[0]
    assert [h.score for h in hits] == pytest.approx([s for _, s in fused[:3]])
    assert [h.doc_id for h in hits] == [retriever.docs.get(r).doc_id for r, _ in fused[:3]]


def test_hits_are_deduplicated(retriever):
    for mode in ("bm25", "dense", "hybrid"):
        hits = retriever.search(["myocardial infarction necrosis of heart muscle coronary"], k=5, mode=mode)[
            0
        ]
        ids = [h.doc_id for h in hits]
        texts = [h.text for h in hits]
        assert len(set(ids)) == len(ids) and len(set(texts)) == len(texts), mode
        assert not ({"d00", "dup-mi"} <= set(ids))  # same text under two ids: only one is returned
        hits = retriever.search(["asthma"], k=5, mode=mode)[0]
        assert [h.doc_id for h in hits].count("d02") <= 1  # reused id: only one is returned


def test_batch_equals_one_by_one(retriever):
    qs = ["kidney stone flank pain", "thyroid", "malaria mosquito", "tremor", "blood pressure"]
    for mode in ("bm25", "dense", "hybrid"):
        batch = retriever.search(qs, k=3, mode=mode)
        single = [retriever.search([q], k=3, mode=mode)[0] for q in qs]
        assert [[h.doc_id for h in hs] for hs in batch] == [[h.doc_id for h in hs] for hs in single]
        for b_hits, s_hits in zip(batch, single):
            assert [h.score for h in b_hits] == pytest.approx([h.score for h in s_hits], abs=1e-5)


def test_search_argument_errors(retriever):
    with pytest.raises(ValueError, match="unknown retrieval mode 'sparse'"):
        retriever.search(["x"], mode="sparse")
    with pytest.raises(TypeError, match="list of queries"):
        retriever.search("chest pain")
    with pytest.raises(ValueError, match="k must be a positive integer"):
        retriever.search(["x"], k=0)
    assert retriever.search([], k=3) == []
    # k above the corpus: every document once, minus the two duplicates (same text; reused id)
    assert len(retriever.search(["pain"], k=500, mode="dense")[0]) == retriever.doc_count - 2


def test_weights_and_config_change_fusion(index_dir, encoder):
    only_dense = HybridRetriever.load(index_dir, encoder=encoder, config=RetrievalConfig(bm25_weight=0.0))
    q = ["pain radiating to the back"]
    hybrid_ids = [h.doc_id for h in only_dense.search(q, k=3, mode="hybrid")[0]]
    dense_ids = [h.doc_id for h in only_dense.search(q, k=3, mode="dense")[0]]
    assert hybrid_ids == dense_ids
    assert only_dense.config.bm25_weight == 0.0


def test_bm25_only_index(tmp_path):
    out = build_index(_docs()[:10], tmp_path / "sparse", RetrievalConfig(), dense=False, show_progress=False)
    r = HybridRetriever.load(out)
    assert r.modes == ("bm25",) and r.manifest["encoder"] is None and r.manifest["modes"] == ["bm25"]
    assert r.search(["asthma wheeze"], k=1, mode="bm25")[0][0].title == "Asthma"
    with pytest.raises(ValueError, match="built without them"):
        r.search(["asthma"], mode="hybrid")
    with pytest.raises(ValueError, match="built without them"):
        r.search(["asthma"], mode="dense")
    assert not (out / "embeddings.npy").exists()


def test_chunked_build_and_ivf_from_config(tmp_path, encoder):
    long_doc = Document("long", "Long", " ".join(x for _, x in FACTS[:12]), "toy")
    cfg = RetrievalConfig(chunk_words=30, chunk_overlap=5, faiss_index="ivf", ivf_nlist=64, ivf_nprobe=64)
    out = build_index([long_doc], tmp_path / "chunked", cfg, encoder=encoder, show_progress=False)
    r = HybridRetriever.load(out, encoder=encoder)
    assert r.doc_count > 3 and r.docs.get(0).doc_id == "long#0"
    assert r.manifest["dense"]["faiss_index"] == "ivf" and r.manifest["dense"]["nlist"] >= 1
    hit = r.search(["thrombus in the pulmonary arteries"], k=1, mode="dense")[0][0]
    assert "pulmonary arteries" in hit.text and hit.doc_id.startswith("long#")


def test_no_pickle_anywhere(index_dir):
    files = [p for p in index_dir.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".pkl", ".pickle", ".pt", ".bin")]
    for p in files:
        if p.suffix == ".npy":
            np.load(p, allow_pickle=False)
        with open(p, "rb") as f:  # no pickle protocol header at the start of any file
            assert not f.read(2).startswith(b"\x80")
