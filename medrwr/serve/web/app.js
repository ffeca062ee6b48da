/* MedRwR web page: asks the OpenAI-compatible API (POST /v1/chat/completions, stream=true) and draws the
 * rollout as it streams: the model's reasoning, each search with the documents it returned, the CDIR case
 * and the answer with its option distribution. Contract: docs/serving.md; page: docs/web-page.md.
 *
 * Every string from the model, the documents or the server is put in the page as text (textContent,
 * createTextNode), never as HTML. Images from the server are used only when they are data:image/ URLs.
 */
(function () {
  "use strict";

  var LETTERS = "ABCDEFGHIJ";
  var MAX_FILE_BYTES = 20 * 1024 * 1024;
  var TAG_RE = /<\/?(think|query|answer|retrieve)>/g;

  var $ = function (id) { return document.getElementById(id); };
  var form = $("ask-form"), question = $("question"), optionList = $("option-list");
  var timeline = $("timeline"), alertBox = $("alert"), runStatus = $("run-status");
  var submitBtn = $("submit"), stopBtn = $("stop"), modelSelect = $("model"), apiKey = $("api-key");

  var state = { image: null, imageName: "", imageMime: "", controller: null, run: null, textOnly: false };

  // ---------------------------------------------------------------- small DOM helpers (text only)

  function h(tag, attrs) {
    var el = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        var v = attrs[k];
        if (v === null || v === undefined || v === false) return;
        if (k === "class") el.className = v;
        else if (k === "text") el.textContent = v;
        else el.setAttribute(k, v === true ? "" : String(v));
      });
    }
    for (var i = 2; i < arguments.length; i++) {
      var c = arguments[i];
      if (c === null || c === undefined || c === false) continue;
      el.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
    }
    return el;
  }

  function clear(el) { while (el.firstChild) el.removeChild(el.firstChild); }
  function pct(p) { return (Math.round(Number(p) * 1000) / 10).toFixed(1) + "%"; }
  function isNum(x) { return typeof x === "number" && isFinite(x); }
  function safeImageUrl(u) { return typeof u === "string" && /^data:image\/(png|jpeg|jpg|gif|webp);base64,/i.test(u) ? u : null; }

  // ---------------------------------------------------------------- alerts and status

  function showError(title, detail) {
    clear(alertBox);
    alertBox.appendChild(h("strong", null, title));
    if (detail) alertBox.appendChild(h("span", null, " " + detail));
    alertBox.hidden = false;
  }

  function hideError() { alertBox.hidden = true; clear(alertBox); }

  function setRunStatus(text, busy) {
    runStatus.textContent = text;
    runStatus.classList.toggle("busy", !!busy);
  }

  /** An OpenAI-shaped error body ({"error": {"message", "type", "code", "param"}}) as one line. */
  function describeApiError(body, status) {
    var e = body && body.error;
    if (e && typeof e === "object") {
      var bits = [];
      if (e.type) bits.push(String(e.type));
      if (e.code !== undefined && e.code !== null) bits.push(String(e.code));
      var msg = String(e.message || "no message");
      var where = e.param && msg.indexOf(String(e.param)) < 0 ? " (" + String(e.param) + ")" : "";
      return { title: "The server refused the request" + (status ? " (HTTP " + status + ")" : "") + ":",
               detail: msg + where + (bits.length ? " [" + bits.join(", ") + "]" : "") };
    }
    if (typeof e === "string") return { title: "Server error" + (status ? " (HTTP " + status + ")" : "") + ":", detail: e };
    return { title: "Server error" + (status ? " (HTTP " + status + ")" : ""), detail: body && body.detail ? String(body.detail) : "" };
  }

  function authHeaders() {
    var hdrs = {};
    var key = apiKey.value.trim();
    if (key) hdrs["Authorization"] = "Bearer " + key;
    return hdrs;
  }

  // ---------------------------------------------------------------- server status and models

  function loadServerInfo() {
    var status = $("server-status");
    Promise.all([
      fetch("/healthz").then(function (r) { return r.ok ? r.json().catch(function () { return {}; }) : null; })
        .catch(function () { return null; }),
      fetch("/v1/models", { headers: authHeaders() }).then(function (r) {
        return r.ok ? r.json() : r.json().catch(function () { return {}; }).then(function (b) { throw describeApiError(b, r.status); });
      }),
    ]).then(function (res) {
      var models = (res[1] && res[1].data) || [];
      var previous = modelSelect.value;
      clear(modelSelect);
      models.forEach(function (m) { modelSelect.appendChild(h("option", { value: m.id }, m.id)); });
      if (previous) modelSelect.value = previous;
      if (!models.length) modelSelect.appendChild(h("option", { value: "" }, "(server default)"));
      var health = res[0];
      status.textContent = (health ? "Server ready" : "Server not healthy") + (models.length ? " · " + models[0].id : "");
      status.className = "server-status " + (health ? "ok" : "bad");
      if (health) applyCapabilities(health);
    }).catch(function (err) {
      if (!modelSelect.options.length) modelSelect.appendChild(h("option", { value: "" }, "(server default)"));
      status.textContent = err && err.detail ? "Models: " + err.detail : "Cannot reach the server";
      status.className = "server-status bad";
    });
  }

  /** What /healthz says the server can do: a text-only policy gets no image; CDIR needs an image index. */
  function applyCapabilities(health) {
    state.textOnly = health.supports_images === false;
    var note = $("capability-note"), cdir = $("cdir"), notes = [];
    if (state.textOnly) notes.push("The served model reads text only, so the image is not sent. Start the server with a " +
                                   "vision-language model (--model) to ask about images.");
    var noCdir = state.textOnly || health.image_index === false;
    cdir.disabled = noCdir;
    if (noCdir) cdir.checked = false;
    else if (health.cdir_default === true) cdir.checked = true;
    if (noCdir && !state.textOnly) notes.push("This server has no image index, so CDIR is off.");
    note.textContent = notes.join(" ");
    note.hidden = !notes.length;
  }

  // ---------------------------------------------------------------- options

  function relabelOptions() {
    var rows = optionList.children;
    for (var i = 0; i < rows.length; i++) {
      var L = LETTERS[i];
      var input = rows[i].querySelector("input"), label = rows[i].querySelector("label"), btn = rows[i].querySelector("button");
      input.id = "option-" + L;
      input.setAttribute("aria-label", "Option " + L);
      label.htmlFor = input.id;
      label.textContent = L + ".";
      btn.setAttribute("aria-label", "Remove option " + L);
    }
    $("add-option").disabled = rows.length >= LETTERS.length;
  }

  function addOption(text, focus) {
    if (optionList.children.length >= LETTERS.length) return;
    var input = h("input", { type: "text", class: "option-input", autocomplete: "off" });
    input.value = text || "";
    var remove = h("button", { type: "button", class: "icon-button", title: "Remove this option" }, "×");
    var row = h("li", { class: "option-row" }, h("label", { class: "option-letter" }), input, remove);
    remove.addEventListener("click", function () {
      var next = row.nextElementSibling || row.previousElementSibling;
      optionList.removeChild(row);
      relabelOptions();
      (next ? next.querySelector("input") : $("add-option")).focus();
    });
    optionList.appendChild(row);
    relabelOptions();
    if (focus) input.focus();
  }

  function setOptions(list) {
    clear(optionList);
    list.forEach(function (t) { addOption(t, false); });
    relabelOptions();
  }

  function readOptions() {
    var out = [], rows = optionList.querySelectorAll("input");
    for (var i = 0; i < rows.length; i++) {
      var v = rows[i].value.trim();
      if (!v) return { error: "Option " + LETTERS[i] + " is empty: fill it in or remove it.", input: rows[i] };
      out.push(v);
    }
    return { options: out };
  }

  // ---------------------------------------------------------------- images

  function showPreview(src, caption, alt) {
    var img = $("preview-img");
    if (src) { img.src = src; img.alt = alt || caption; } else { img.removeAttribute("src"); img.alt = ""; }
    $("preview-caption").textContent = caption;
    $("preview").hidden = !src;
  }

  function readAsDataUrl(blob) {
    return new Promise(function (resolve, reject) {
      var fr = new FileReader();
      fr.onload = function () { resolve(fr.result); };
      fr.onerror = function () { reject(fr.error); };
      fr.readAsDataURL(blob);
    });
  }

  function selectExample(ex) {
    hideError();
    return fetch(ex.image).then(function (r) {
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.blob();
    }).then(readAsDataUrl).then(function (url) {
      state.image = url; state.imageName = ex.image; state.imageMime = "image/png";
      showPreview(url, ex.label + " (synthetic example)", ex.alt);
      question.value = ex.question;
      setOptions(ex.options);
    }).catch(function (err) { showError("Could not load the example image:", String(err.message || err)); });
  }

  function loadExamples() {
    var box = $("examples");
    fetch("examples.json").then(function (r) { return r.json(); }).then(function (list) {
      var group = h("div", { class: "example-grid", role: "radiogroup", "aria-label": "Example images" });
      list.forEach(function (ex, i) {
        var id = "example-" + i;
        var radio = h("input", { type: "radio", name: "example", id: id, class: "visually-hidden", value: String(i) });
        var label = h("label", { for: id, class: "example" },
          h("img", { src: ex.image, alt: "", width: 56, height: 56 }), h("span", null, ex.label));
        radio.addEventListener("change", function () { if (radio.checked) selectExample(ex); });
        group.appendChild(radio); group.appendChild(label);
      });
      box.appendChild(group);
      var first = group.querySelector("input");
      if (first && !state.image) { first.checked = true; selectExample(list[0]); }
    }).catch(function () { /* the page works without examples: upload instead */ });
  }

  function looksLikeDicom(file, head) {
    if (/\.(dcm|dicom)$/i.test(file.name) || file.type === "application/dicom") return true;
    return head.length >= 132 && head[128] === 68 && head[129] === 73 && head[130] === 67 && head[131] === 77; // "DICM"
  }

  function onUpload(ev) {
    var file = ev.target.files && ev.target.files[0];
    if (!file) return;
    hideError();
    if (file.size > MAX_FILE_BYTES) { showError("That file is too large:", file.name + " is " + Math.round(file.size / 1048576) + " MB; the limit is 20 MB."); return; }
    file.slice(0, 132).arrayBuffer().then(function (buf) {
      var head = new Uint8Array(buf);
      var dicom = looksLikeDicom(file, head);
      if (!dicom && !/^image\/(png|jpeg)$/.test(file.type)) throw new Error(file.name + " is not a PNG, JPEG or DICOM file.");
      return readAsDataUrl(file).then(function (url) {
        if (dicom) url = "data:application/dicom;base64," + url.slice(url.indexOf(",") + 1);
        state.image = url; state.imageName = file.name; state.imageMime = dicom ? "application/dicom" : file.type;
        Array.prototype.forEach.call(document.querySelectorAll("input[name=example]"), function (r) { r.checked = false; });
        showPreview(dicom ? null : url, file.name + (dicom ? " (DICOM: no preview here; the server decodes it)" : ""), "Uploaded image " + file.name);
      });
    }).catch(function (err) { showError("Cannot use that file:", String(err.message || err)); });
  }

  // ---------------------------------------------------------------- the run's view

  function newRun() {
    clear(timeline);
    $("empty").hidden = true;
    return { thought: null, queries: {}, queryOrder: [], cdir: false, answer: null, answerText: "", options: [], traced: false,
             answerMarks: [] };
  }

  function step(kind, label) {
    var li = h("li", { class: "step step-" + kind }, h("div", { class: "step-label" }, label));
    timeline.appendChild(li);
    var marks = state.run ? state.run.answerMarks : [];
    if (kind !== "cdir" && marks.length && !marks[marks.length - 1].anchor) marks[marks.length - 1].anchor = li;
    return li;
  }

  /** Renders the model's raw turn text as spans: think text plain, query text marked, tags removed. */
  function renderThought(t) {
    var b = t.body, atBottom = b.scrollHeight - b.scrollTop - b.clientHeight < 8; // follow the stream unless scrolled up
    clear(t.body);
    var parts = [], mode = "think", last = 0, m;
    TAG_RE.lastIndex = 0;
    while ((m = TAG_RE.exec(t.raw)) !== null) {
      parts.push({ mode: mode, text: t.raw.slice(last, m.index) });
      mode = m[0].charAt(1) === "/" ? "think" : m[1];
      last = TAG_RE.lastIndex;
    }
    var tail = t.raw.slice(last);
    var open = tail.lastIndexOf("<"); // hide a tag still being streamed ("<que")
    if (open >= 0 && tail.indexOf(">", open) < 0 && tail.length - open < 12) tail = tail.slice(0, open);
    parts.push({ mode: mode, text: tail });
    var shown = 0;
    parts.forEach(function (p) {
      var text = p.text;
      if (!text.trim()) return;
      if (p.mode === "query") {
        if (t.done) return; // the search card below shows it
        t.body.appendChild(h("span", { class: "inline-query" }, "Searching: " + text.trim()));
      } else if (p.mode === "answer") {
        if (!t.firstAnswer || !text.trim()) return;
        t.body.appendChild(h("span", { class: "inline-answer" }, "First answer: " + text.trim()));
      } else {
        t.body.appendChild(document.createTextNode((shown ? " " : "") + text.trim()));
      }
      shown++;
    });
    t.li.hidden = shown === 0;
    if (atBottom && !t.done) b.scrollTop = b.scrollHeight;
  }

  function onReasoningToken(run, text) {
    if (!run.thought) {
      var li = step("think", "Reasoning");
      var body = h("p", { class: "stream-text", "aria-busy": "true" });
      li.appendChild(body);
      run.thought = { li: li, body: body, raw: "", done: false, pending: false };
    }
    var t = run.thought;
    t.raw += text;
    var end = t.raw.indexOf("</answer>");
    if (end >= 0) { // an answer written mid-stream: the first answer that CDIR re-examines
      var rest = t.raw.slice(end + "</answer>".length);
      t.raw = t.raw.slice(0, end + "</answer>".length);
      closeThought(run);
      // If CDIR follows, this was the first answer: its card goes right here, before what comes next.
      run.answerMarks.push({ thought: t, anchor: null });
      if (rest) onReasoningToken(run, rest);
      return;
    }
    if (!t.pending) {
      t.pending = true;
      requestAnimationFrame(function () { t.pending = false; renderThought(t); });
    }
  }

  function closeThought(run) {
    var t = run.thought;
    if (!t) return;
    t.done = true;
    t.body.setAttribute("aria-busy", "false");
    renderThought(t);
    run.thought = null;
  }

  function queryCard(run, round, text) {
    var key = String(round) + "\u0000" + text;
    if (run.queries[key]) return run.queries[key];
    closeThought(run);
    var li = step("query", "Search" + (isNum(round) ? " · round " + round : ""));
    var hits = h("div", { class: "hits" }, h("p", { class: "pending" }, "Searching the knowledge base…"));
    li.appendChild(h("p", { class: "query-text" }, h("span", { class: "visually-hidden" }, "Query: "), h("span", { class: "query-words" }, text)));
    li.appendChild(hits);
    var card = { li: li, hits: hits, filled: false };
    run.queries[key] = card;
    run.queryOrder.push(card);
    return card;
  }

  function fillHits(card, hits, error) {
    clear(card.hits);
    card.filled = true;
    if (error) { card.hits.appendChild(h("p", { class: "hit-error" }, "Retrieval failed: " + String(error))); return; }
    if (!hits || !hits.length) { card.hits.appendChild(h("p", { class: "pending" }, "No documents found.")); return; }
    var list = h("ol", { class: "hit-list", "aria-label": "Retrieved documents" });
    hits.forEach(function (hit, i) {
      var meta = h("span", { class: "hit-meta" });
      if (hit.source) meta.appendChild(h("span", { class: "hit-source" }, String(hit.source)));
      if (isNum(hit.score)) meta.appendChild(h("span", { class: "hit-score", title: "retrieval score" }, "score " + hit.score.toFixed(3)));
      var details = h("details", { class: "hit" },
        h("summary", null, h("span", { class: "hit-rank" }, String(i + 1)), h("span", { class: "hit-title" }, String(hit.title || hit.doc_id || "untitled")), meta),
        h("p", { class: "hit-text" }, String(hit.text || "")),
        hit.doc_id ? h("p", { class: "hit-id" }, "doc id: " + String(hit.doc_id)) : null);
      list.appendChild(h("li", null, details));
    });
    card.hits.appendChild(list);
  }

  function onRetrieval(run, ev) {
    var queries = ev.queries || [];
    queries.forEach(function (q, i) {
      fillHits(queryCard(run, ev.round, String(q)), (ev.hits || [])[i] || [], ev.error);
    });
  }

  function letterText(run, letter) {
    var i = LETTERS.indexOf(letter);
    return i >= 0 && run.options[i] ? letter + ". " + run.options[i] : String(letter);
  }

  function onCdir(run, ev) {
    if (run.cdir) return;
    run.cdir = true;
    closeThought(run);
    var li = step("cdir", "Similar case (CDIR)");
    var mark = run.answerMarks[0]; // CDIR re-examines the first answer: show it, and the card right after it
    if (mark && mark.anchor && mark.anchor.parentNode === timeline) timeline.insertBefore(li, mark.anchor);
    if (mark) { mark.thought.firstAnswer = true; renderThought(mark.thought); }
    var first = ev.first_answer, conf = ev.first_confidence;
    li.appendChild(h("p", { class: "cdir-why" },
      "First answer " + (first ? String(first) : "(none)") + (isNum(conf) ? " at " + pct(conf) : "") +
      (isNum(ev.threshold) ? ", below the " + pct(ev.threshold) + " threshold" : "") + ": the model looked at the most similar case."));
    var c = ev.case || {};
    var img = safeImageUrl(c.image);
    var fig = h("figure", { class: "case" },
      img ? h("img", { src: img, alt: "Similar case image" + (c.image_id ? " " + String(c.image_id) : "") }) : h("div", { class: "case-noimg" }, "no image"),
      h("figcaption", null,
        h("span", { class: "case-id" }, "Case " + String(c.image_id || "?") + (isNum(c.score) ? " · similarity " + c.score.toFixed(3) : "")),
        h("span", { class: "case-report" }, String(c.report || "(no report)"))));
    li.appendChild(fig);
    if (ev.second_answer !== undefined && ev.second_answer !== null)
      li.appendChild(h("p", { class: "cdir-second" }, "Answer after the case: " + String(ev.second_answer) +
        (isNum(ev.second_confidence) ? " at " + pct(ev.second_confidence) : "")));
  }

  function answerCard(run) {
    if (run.answer) return run.answer;
    closeThought(run);
    var li = step("answer", "Answer");
    var main = h("p", { class: "answer-main" });
    var conf = h("p", { class: "confidence" });
    var dist = h("div", { class: "dist" });
    li.appendChild(main); li.appendChild(conf); li.appendChild(dist);
    run.answer = { li: li, main: main, conf: conf, dist: dist };
    return run.answer;
  }

  function onAnswerToken(run, text) {
    run.answerText += text;
    var card = answerCard(run);
    if (!run.traced) card.main.textContent = run.answerText.replace(TAG_RE, "").trim(); // the trace draws it better
  }

  function drawDistribution(run, card, probs, choice) {
    clear(card.dist);
    var letters = Object.keys(probs).sort();
    if (!letters.length) return;
    card.dist.appendChild(h("h3", { class: "dist-title", id: "dist-title" }, "Option distribution (renormalised over the options)"));
    var list = h("ul", { class: "bars", "aria-labelledby": "dist-title" });
    letters.forEach(function (L) {
      var p = Math.max(0, Math.min(1, Number(probs[L]) || 0));
      var fill = h("span", { class: "bar-fill" });
      fill.style.width = (p * 100).toFixed(1) + "%";
      list.appendChild(h("li", { class: "bar-row" + (L === choice ? " chosen" : "") },
        h("span", { class: "bar-label" }, letterText(run, L)),
        h("span", { class: "bar", role: "img", "aria-label": L + " " + pct(p) }, fill),
        h("span", { class: "bar-value" }, pct(p))));
    });
    card.dist.appendChild(list);
  }

  function onTrace(run, tr) {
    run.traced = true;
    if (!run.queryOrder.length && Array.isArray(tr.retrievals)) tr.retrievals.forEach(function (r) { onRetrieval(run, r); });
    var cd = tr.cdir;
    if (!run.cdir && cd && cd.triggered) {
      if (cd.case || cd.first_answer !== undefined) onCdir(run, cd); // the API's trace (docs/serving.md)
      else { // a RolloutTrace.to_dict() record
        var c = (cd.cases && cd.cases[0]) || {};
        onCdir(run, { first_answer: cd.first && (cd.first.choice || cd.first.answer), first_confidence: cd.first && cd.first.confidence,
                      threshold: cd.threshold, case: { image_id: c.image_id, report: c.report, score: c.score, image: c.image },
                      second_answer: cd.second && (cd.second.choice || cd.second.answer), second_confidence: cd.second && cd.second.confidence });
      }
    }
    var card = answerCard(run);
    var answer = tr.answer !== undefined && tr.answer !== null ? String(tr.answer) : run.answerText;
    var choice = tr.choice || null;
    clear(card.main);
    if (choice) {
      card.main.appendChild(h("span", { class: "answer-letter" }, choice));
      var opt = run.options[LETTERS.indexOf(choice)];
      card.main.appendChild(h("span", { class: "answer-text" }, opt || answer.replace(TAG_RE, "").trim()));
    } else {
      card.main.appendChild(h("span", { class: "answer-text" }, answer.replace(TAG_RE, "").trim() || "(no answer)"));
    }
    clear(card.conf);
    if (isNum(tr.confidence)) {
      var meter = h("span", { class: "conf-meter", role: "img", "aria-label": "confidence " + pct(tr.confidence) }, h("span", { class: "conf-fill" }));
      meter.firstChild.style.width = (Math.max(0, Math.min(1, tr.confidence)) * 100).toFixed(1) + "%";
      card.conf.appendChild(h("span", { class: "conf-label", title: "the probability the model gave the answer's letter token" },
        "Confidence " + pct(tr.confidence)));
      card.conf.appendChild(meter);
    }
    var meta = [];
    if (Array.isArray(tr.queries)) meta.push(tr.queries.length + (tr.queries.length === 1 ? " search" : " searches"));
    if (tr.stop_reason && tr.stop_reason !== "answer") meta.push("stopped: " + String(tr.stop_reason));
    if (tr.error) meta.push("error: " + String(tr.error));
    if (meta.length) card.conf.appendChild(h("span", { class: "answer-meta" }, meta.join(" · ")));
    if (tr.option_probs && typeof tr.option_probs === "object") drawDistribution(run, card, tr.option_probs, choice);
  }

  // ---------------------------------------------------------------- events and the SSE stream

  /** One MedRwR event, whether it came as a named SSE event or in a chunk's ``medrwr_event`` field. */
  function dispatchEvent(run, name, data) {
    if (!data || typeof data !== "object") return;
    var n = String(name || "").replace(/^medrwr[._]/, "");
    if (n === "query") { if (data.query) queryCard(run, data.round, String(data.query)); }
    else if (n === "retrieval") onRetrieval(run, data);
    else if (n === "cdir") onCdir(run, data);
    else if (n === "trace") onTrace(run, data.trace && typeof data.trace === "object" ? data.trace : data);
  }

  function onChunk(run, obj) {
    if (obj.error) { var e = describeApiError(obj); throw Object.assign(new Error(e.detail), { api: e }); }
    var ev = obj.medrwr_event;
    if (ev && typeof ev === "object") {
      var name = ev.event || ev.type || ev.name;
      dispatchEvent(run, name, ev.data !== undefined ? ev.data : ev);
    }
    var choice = obj.choices && obj.choices[0];
    if (!choice) return;
    var d = choice.delta || {};
    if (typeof d.reasoning_content === "string" && d.reasoning_content) onReasoningToken(run, d.reasoning_content);
    if (typeof d.content === "string" && d.content) onAnswerToken(run, d.content);
    if (obj.medrwr && typeof obj.medrwr === "object" && !run.traced) onTrace(run, obj.medrwr);
  }

  function handleFrame(run, frame) {
    if (!frame.data) return false;
    if (frame.data === "[DONE]") return true;
    var obj;
    try { obj = JSON.parse(frame.data); } catch (e) { return false; }
    if (frame.event && frame.event !== "message") dispatchEvent(run, frame.event, obj);
    else onChunk(run, obj);
    return false;
  }

  /** Reads ``text/event-stream`` from a fetch body; calls handleFrame per event; resolves at [DONE] or EOF. */
  function readStream(run, body) {
    var reader = body.getReader(), decoder = new TextDecoder(), buf = "";
    var frame = { event: "", data: "" };
    function pump() {
      return reader.read().then(function (res) {
        if (res.done) buf += "\n\n"; else buf += decoder.decode(res.value, { stream: true });
        var nl;
        while ((nl = buf.search(/\r\n|\r|\n/)) >= 0) {
          var line = buf.slice(0, nl);
          buf = buf.slice(nl + (buf.substr(nl, 2) === "\r\n" ? 2 : 1));
          if (line === "") {
            var done = handleFrame(run, frame);
            frame = { event: "", data: "" };
            if (done) { reader.cancel().catch(function () {}); return; }
            continue;
          }
          if (line.charAt(0) === ":") continue;
          var colon = line.indexOf(":");
          var field = colon < 0 ? line : line.slice(0, colon);
          var value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
          if (field === "event") frame.event = value;
          else if (field === "data") frame.data = frame.data ? frame.data + "\n" + value : value;
        }
        if (res.done) return;
        return pump();
      });
    }
    return pump();
  }

  function buildBody(q, options) {
    var text = q + (options.length ? "\n" + options.map(function (o, i) { return LETTERS[i] + ". " + o; }).join("\n") : "");
    var content = [{ type: "text", text: text }];
    if (state.image && !state.textOnly) content.push({ type: "image_url", image_url: { url: state.image } });
    var body = { messages: [{ role: "user", content: content }], stream: true, medrwr_cdir: $("cdir").checked };
    if (modelSelect.value) body.model = modelSelect.value;
    if (options.length) {
      body.medrwr_options = {};
      options.forEach(function (o, i) { body.medrwr_options[LETTERS[i]] = o; });
    }
    var t = parseFloat($("temperature").value), m = parseInt($("max-tokens").value, 10);
    if (isFinite(t)) body.temperature = t;
    if (isFinite(m) && m > 0) body.max_tokens = m;
    return body;
  }

  function setBusy(busy) {
    submitBtn.disabled = busy;
    stopBtn.disabled = !busy;
    form.setAttribute("aria-busy", busy ? "true" : "false");
  }

  function submit() {
    if (state.controller) return;
    hideError();
    var q = question.value.trim();
    if (!q) { showError("Write a question first.", ""); question.focus(); return; }
    var opts = readOptions();
    if (opts.error) { showError(opts.error, ""); opts.input.focus(); return; }
    var run = state.run = newRun();
    run.options = opts.options;
    var controller = state.controller = new AbortController();
    setBusy(true);
    setRunStatus("Thinking…", true);
    var headers = Object.assign({ "Content-Type": "application/json", Accept: "text/event-stream" }, authHeaders());
    fetch("/v1/chat/completions", { method: "POST", headers: headers, body: JSON.stringify(buildBody(q, opts.options)), signal: controller.signal })
      .then(function (r) {
        if (!r.ok) {
          return r.text().then(function (t) {
            var b; try { b = JSON.parse(t); } catch (e) { b = { error: t || r.statusText }; }
            var e2 = describeApiError(b, r.status);
            throw Object.assign(new Error(e2.detail), { api: e2 });
          });
        }
        return readStream(run, r.body);
      })
      .then(function () {
        closeThought(run);
        if (!run.answer) showError("The stream ended without an answer.", "");
        setRunStatus(run.answer ? "Done." : "Stopped.", false);
      })
      .catch(function (err) {
        closeThought(run);
        if (err && err.name === "AbortError") { setRunStatus("Stopped.", false); return; }
        var api = err && err.api;
        if (api) showError(api.title, api.detail);
        else showError("Cannot reach the server:", String((err && err.message) || err));
        setRunStatus("Failed.", false);
      })
      .then(function () { state.controller = null; setBusy(false); });
  }

  // ---------------------------------------------------------------- wiring

  form.addEventListener("submit", function (ev) { ev.preventDefault(); submit(); });
  form.addEventListener("keydown", function (ev) {
    if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) { ev.preventDefault(); submit(); }
  });
  stopBtn.addEventListener("click", function () { if (state.controller) state.controller.abort(); });
  $("add-option").addEventListener("click", function () { addOption("", true); });
  $("upload").addEventListener("change", onUpload);
  apiKey.addEventListener("change", loadServerInfo);

  setOptions(["", ""]);
  loadExamples();
  loadServerInfo();
})();
