// fluxserve playground: plain ES module, no build step, no network but the endpoint the user sets.
import { History } from "/web/history.js";

const $ = (id) => document.getElementById(id);
const KEYS = { endpoint: "fluxserve.endpoint", key: "fluxserve.apiKey" };
// Steps, guidance and reference limits come from each model's entry in /v1/models (the server's registry).
const OPENAI_SIZES = { "1:1": "1024x1024", "16:9": "1792x1024", "9:16": "1024x1792" };
const state = { models: [], loras: [], fluxserve: true, attachments: [], pending: 0 };
const history = new History();

function settings() {
  return {
    endpoint: (localStorage.getItem(KEYS.endpoint) || location.origin).replace(/\/+$/, ""),
    key: localStorage.getItem(KEYS.key) || "",
  };
}

function headers(extra = {}) {
  const { key } = settings();
  return key ? { Authorization: `Bearer ${key}`, ...extra } : extra;
}

function showBanner(text) {
  const b = $("banner");
  b.textContent = text;
  b.hidden = !text;
}

function setStatus(text, ok) {
  const s = $("conn-status");
  s.textContent = text;
  s.className = ok ? "ok" : "bad";
}

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

// Every API call goes through here, so a bad key or a dead endpoint is reported the same way everywhere.
async function api(path, options = {}) {
  const { endpoint } = settings();
  let resp;
  try {
    resp = await fetch(endpoint + path, { ...options, headers: headers(options.headers || {}) });
  } catch (err) {
    const message = `Cannot reach ${endpoint}: is the server running, and does it allow this page's origin (CORS)?`;
    showBanner(message);
    throw new ApiError(0, message);
  }
  if (resp.ok) return resp;
  let message = `HTTP ${resp.status}`;
  try {
    const body = await resp.json();
    message = body.error?.message || (typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)) || message;
  } catch (_) {
    message = `${message}: ${resp.statusText}`;
  }
  if (resp.status === 401) {
    showBanner("The API key was rejected (401). Open Settings and check the key.");
    openSettings(true);
  }
  throw new ApiError(resp.status, message);
}

function openSettings(open, focus = true) {
  $("settings").hidden = !open;
  $("settings-toggle").setAttribute("aria-expanded", String(open));
  if (open && focus) $("api-key").focus();
}

async function connect() {
  setStatus("Connecting…", true);
  try {
    const body = await (await api("/v1/models")).json();
    state.models = body.data || [];
    state.fluxserve = state.models.some((m) => String(m.owned_by || "").startsWith("fluxserve"));
    fillModels();
    await loadLoras();
    showBanner("");
    setStatus(`Connected: ${state.models.length} models${state.models.some((m) => m.demo) ? " (demo)" : ""}`, true);
    openSettings(false);
  } catch (err) {
    setStatus(err.message, false);
  }
}

function fillModels() {
  const select = $("model");
  const previous = select.value;
  select.replaceChildren();
  for (const m of state.models) {
    if (m.id === "flux-fill") continue; // needs a mask, which this page does not draw
    const opt = new Option(m.demo ? `${m.id} (demo)` : m.id, m.id);
    select.append(opt);
  }
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
  else if ([...select.options].some((o) => o.value === "flux-schnell")) select.value = "flux-schnell";
  updateControls();
}

// The adapters in the server's LoRA folder (GET /v1/loras); other servers have none to offer.
async function loadLoras() {
  state.loras = [];
  if (state.fluxserve) {
    try {
      state.loras = (await (await api("/v1/loras")).json()).data || [];
    } catch {
      state.loras = [];
    }
  }
  const select = $("lora");
  const previous = select.value;
  select.replaceChildren(new Option("none", ""));
  for (const l of state.loras) select.append(new Option(l.family ? `${l.name} (${l.family})` : l.name, l.name));
  if ([...select.options].some((o) => o.value === previous)) select.value = previous;
  for (const label of document.querySelectorAll(".lora")) label.hidden = state.loras.length === 0;
  updateControls();
}

function facts(id) {
  return state.models.find((m) => m.id === id) || {};
}

function takesReferences(id) {
  return (facts(id).inputs || []).includes("images");
}

// The model an edit runs on: the chosen one if it takes references, else Kontext (the seed's edit model).
function editModel(id) {
  if (takesReferences(id)) return id;
  return state.models.some((m) => m.id === "flux-kontext-pro") ? "flux-kontext-pro" : (state.models.find((m) => takesReferences(m.id)) || {}).id;
}

function updateControls() {
  const f = facts($("model").value);
  const guidance = f.guidance || null;
  document.querySelector(".guidance").hidden = !guidance;
  if (guidance) {
    Object.assign($("guidance"), { min: guidance.min, max: guidance.max, placeholder: `default ${guidance.default}` });
  }
  if (f.steps) Object.assign($("steps"), { max: f.steps.max, placeholder: `default ${f.steps.default}` });
  // Only adapters trained for the chosen model's generation are offered.
  // FLUX 3 takes none here (diffusers has no LoRA loader for it).
  const family = { flux2: "FLUX.2", flux3: "FLUX 3" }[f.kind] || "FLUX.1";
  for (const opt of $("lora").options) {
    const l = state.loras.find((x) => x.name === opt.value);
    opt.disabled = Boolean(l && (f.kind === "flux3" || (l.family && l.family !== family)));
  }
  if ($("lora").selectedOptions[0]?.disabled) $("lora").value = "";
  $("lora-scale").disabled = !$("lora").value;
  updateAttachNote();
}

function updateAttachNote() {
  const note = $("attach-note");
  if (!note) return;
  const model = state.attachments.length ? editModel($("model").value) : null;
  const limit = model ? facts(model).max_images : null;
  note.textContent = model ? `Edit with ${model}${limit ? ` (up to ${limit} images)` : ""}` : "";
  note.classList.toggle("over", Boolean(limit && state.attachments.length > limit));
}

function readControls() {
  const num = (id) => ($(id).value === "" ? null : Number($(id).value));
  return {
    model: $("model").value || "flux-schnell",
    aspect: $("aspect").value,
    megapixels: $("megapixels").value,
    n: Math.min(4, Math.max(1, num("count") || 1)),
    seed: num("seed"),
    steps: num("steps"),
    guidance: facts($("model").value).guidance ? num("guidance") : null,
    format: $("format").value,
    lora: $("lora").value || null,
    loraScale: num("lora-scale") ?? 1,
  };
}

// --- attachments ---------------------------------------------------------------

function addAttachments(files) {
  for (const f of files) if (f.type.startsWith("image/")) state.attachments.push(f);
  renderAttachments();
}

function renderAttachments() {
  const box = $("attachments");
  box.replaceChildren();
  state.attachments.forEach((blob, i) => {
    const chip = document.createElement("span");
    chip.className = "chip";
    const img = document.createElement("img");
    img.src = URL.createObjectURL(blob);
    img.alt = `Attached image ${i + 1}`;
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Remove attached image ${i + 1}`);
    remove.onclick = () => {
      state.attachments.splice(i, 1);
      renderAttachments();
    };
    chip.append(img, remove);
    box.append(chip);
  });
  updateAttachNote();
}

// --- turns -----------------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function describe(turn) {
  const c = turn.controls;
  const parts = [turn.refs.length ? `edit of ${turn.refs.length} image(s)` : c.aspect, c.model, `${c.n} image(s)`];
  if (c.lora) parts.push(`LoRA ${c.lora} × ${c.loraScale}`);
  if (c.steps) parts.push(`${c.steps} steps`);
  if (c.guidance !== null && c.guidance !== undefined) parts.push(`guidance ${c.guidance}`);
  parts.push(c.seed === null ? "random seed" : `seed ${c.seed}`, c.format);
  return parts.join(" · ");
}

function renderTurn(turn) {
  $("empty").hidden = true;
  const card = el("article", "turn");
  card.dataset.turn = turn.id;
  card.append(el("p", "prompt", turn.prompt), el("div", "meta", describe(turn)));
  if (turn.refs.length) {
    const refs = el("div", "refs");
    for (const blob of turn.refs) {
      const img = document.createElement("img");
      img.src = URL.createObjectURL(blob);
      img.alt = "Reference image";
      refs.append(img);
    }
    card.append(refs);
  }
  const bar = document.createElement("progress");
  bar.max = 1;
  const text = el("div", "progress-text", "Sending…");
  const images = el("div", "images");
  card.append(bar, text, images);
  $("chat").append(card);
  card.scrollIntoView({ block: "end" });
  return {
    progress(done, total, label) {
      if (total) {
        bar.max = total;
        bar.value = done;
      } else bar.removeAttribute("value");
      text.textContent = label;
    },
    finish(result) {
      bar.remove();
      text.remove();
      if (result.error) {
        card.append(el("div", "error", result.error));
        return;
      }
      card.append(el("div", "meta", `Done in ${(result.elapsed / 1000).toFixed(1)} s`));
      for (const image of result.images) images.append(renderImage(turn, image));
    },
  };
}

function slug(text) {
  return text.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "").slice(0, 40) || "image";
}

function renderImage(turn, image) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  const url = URL.createObjectURL(image.blob);
  img.src = url;
  img.alt = `${turn.prompt} (seed ${image.seed ?? "unknown"})`;
  img.tabIndex = 0;
  const open = () => {
    $("viewer-img").src = url;
    $("viewer-img").alt = img.alt;
    $("viewer").showModal();
  };
  img.onclick = open;
  img.onkeydown = (e) => {
    if (e.key !== "Enter" && e.key !== " ") return;
    e.preventDefault(); // or the same key press would also activate the viewer's Close button
    open();
  };
  const cap = document.createElement("figcaption");
  const seedText = el("span", "seed", image.seed === null || image.seed === undefined ? "seed ?" : `seed ${image.seed}`);
  const size = el("span", "size", image.width ? `${image.width}×${image.height}` : "");
  img.onload = () => {
    size.textContent = `${img.naturalWidth}×${img.naturalHeight}`;
  };
  const download = document.createElement("a");
  download.href = url;
  download.download = `fluxserve-${slug(turn.prompt)}-${image.seed ?? "x"}.${image.ext}`;
  download.textContent = "Download";
  const reuse = button("Reuse seed", () => {
    $("seed").value = image.seed ?? "";
    $("prompt").focus();
  });
  reuse.disabled = image.seed === null || image.seed === undefined;
  const edit = button("Edit this", () => {
    addAttachments([new File([image.blob], `edit.${image.ext}`, { type: image.blob.type || "image/png" })]);
    $("prompt").focus();
  });
  const curl = button("Copy curl", async () => {
    await copy(curlFor(turn));
    curl.textContent = "Copied";
    setTimeout(() => (curl.textContent = "Copy curl"), 1500);
  });
  cap.append(seedText, size, download, reuse, edit, curl);
  fig.append(img, cap);
  return fig;
}

function button(label, onclick) {
  const b = el("button", "", label);
  b.type = "button";
  b.onclick = onclick;
  return b;
}

async function copy(text) {
  try {
    await navigator.clipboard.writeText(text);
  } catch (_) {
    const area = el("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
}

function shellQuote(s) {
  return `'${String(s).replace(/'/g, `'"'"'`)}'`;
}

function curlFor(turn) {
  const { endpoint } = settings();
  const auth = `-H "Authorization: Bearer $FLUXSERVE_API_KEY"`;
  if (turn.refs.length) {
    const files = turn.refs.map((_, i) => `-F "image[]=@image-${i + 1}.png"`).join(" ");
    const c = turn.controls;
    const lora = c.lora ? ` -F ${shellQuote(`loras=${JSON.stringify([{ path: c.lora, scale: c.loraScale }])}`)}` : "";
    return `curl -X POST ${endpoint}/v1/images/edits ${auth} -F model=${turn.request.model} -F n=${c.n} ${files}${lora} -F prompt=${shellQuote(turn.prompt)}`;
  }
  const path = turn.request.input ? "/vmodel/generate" : "/v1/images/generations";
  return `curl ${endpoint}${path} ${auth} -H "Content-Type: application/json" -d ${shellQuote(JSON.stringify(turn.request))}`;
}

// --- running a turn ----------------------------------------------------------------

async function blobOf(url) {
  if (url.startsWith("data:")) return (await fetch(url)).blob();
  const resp = await fetch(url);
  if (!resp.ok) throw new ApiError(resp.status, `Could not load the image (HTTP ${resp.status}).`);
  return resp.blob();
}

const EXT = { jpeg: "jpg", jpg: "jpg", png: "png", webp: "webp" };

async function runTask(turn, view) {
  const c = turn.controls;
  const input = { prompt: turn.prompt, num_outputs: c.n, aspect_ratio: c.aspect, megapixels: c.megapixels, output_format: c.format };
  if (c.seed !== null) input.seed = c.seed;
  if (c.steps) input.num_inference_steps = c.steps;
  if (c.guidance !== null) input.guidance = c.guidance;
  if (c.lora) Object.assign(input, { lora_weights: c.lora, lora_scale: c.loraScale });
  turn.request = { model: c.model, input };
  const created = await (await api("/vmodel/generate", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(turn.request),
  })).json();
  for (;;) {
    const feed = await (await api(`/vmodel/feed/${created.id}`)).json();
    if (feed.status === "starting") {
      view.progress(0, 0, feed.queue_position ? `Queued, position ${feed.queue_position}` : "Queued");
    } else if (feed.status === "processing") {
      view.progress(feed.progress.step, feed.progress.total, `Step ${feed.progress.step} of ${feed.progress.total}`);
    } else if (feed.status === "succeeded") {
      const blobs = await Promise.all(feed.output.map(blobOf));
      return blobs.map((blob, i) => ({ blob, seed: feed.seeds[i] ?? null, ext: EXT[c.format] }));
    } else {
      throw new ApiError(500, feed.error || "The job failed.");
    }
    await new Promise((r) => setTimeout(r, 300));
  }
}

async function runSync(turn, view) {
  const c = turn.controls;
  const fmt = c.format === "jpg" ? "jpeg" : c.format;
  let resp;
  view.progress(0, 0, "Generating…");
  if (turn.refs.length) {
    const model = editModel(c.model);
    turn.request = { model };
    const form = new FormData();
    form.append("model", model);
    form.append("prompt", turn.prompt);
    form.append("n", String(c.n));
    form.append("output_format", fmt);
    form.append("response_format", "b64_json");
    if (c.seed !== null) form.append("seed", String(c.seed));
    if (c.steps) form.append("steps", String(c.steps));
    if (c.guidance !== null && facts(model).guidance) form.append("guidance", String(c.guidance));
    if (c.lora) form.append("loras", JSON.stringify([{ path: c.lora, scale: c.loraScale }]));
    turn.refs.forEach((blob, i) => form.append("image[]", blob, `image-${i + 1}.png`));
    resp = await api("/v1/images/edits", { method: "POST", body: form });
  } else {
    turn.request = { model: c.model, prompt: turn.prompt, n: c.n, size: OPENAI_SIZES[c.aspect] || "1024x1024", response_format: "b64_json" };
    if (c.lora) turn.request.loras = [{ path: c.lora, scale: c.loraScale }];
    resp = await api("/v1/images/generations", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(turn.request),
    });
  }
  const body = await resp.json();
  return Promise.all(
    body.data.map(async (d) => ({
      blob: await blobOf(d.b64_json ? `data:image/${fmt};base64,${d.b64_json}` : d.url),
      seed: d.seed ?? null,
      ext: EXT[fmt],
    })),
  );
}

async function send() {
  const prompt = $("prompt").value.trim();
  if (!prompt) return;
  const turn = {
    id: `${Date.now()}-${Math.random().toString(36).slice(2, 8)}`,
    prompt,
    controls: readControls(),
    refs: [...state.attachments],
    created: Date.now(),
  };
  if (turn.refs.length) turn.controls.model = editModel(turn.controls.model);
  $("prompt").value = "";
  state.attachments = [];
  renderAttachments();
  const view = renderTurn(turn);
  state.pending += 1;
  updateQueueNote();
  const started = performance.now();
  let result;
  try {
    const images = turn.refs.length || !state.fluxserve ? await runSync(turn, view) : await runTask(turn, view);
    result = { images, elapsed: performance.now() - started };
  } catch (err) {
    result = { images: [], error: err.message, elapsed: performance.now() - started };
  }
  view.finish(result);
  state.pending -= 1;
  updateQueueNote();
  await history.save({ ...turn, result }).catch((err) => console.warn("history not saved", err));
}

function updateQueueNote() {
  $("queue-note").textContent = state.pending ? `${state.pending} request(s) running` : "";
}

// --- wiring ------------------------------------------------------------------------

function init() {
  const s = settings();
  $("endpoint").value = s.endpoint;
  $("api-key").value = s.key;
  if (!s.key) openSettings(true);
  // On a phone the options would cover the conversation: start them folded.
  if (matchMedia("(max-width: 600px)").matches) $("controls").open = false;
  $("settings-toggle").onclick = () => openSettings($("settings").hidden);
  $("settings-form").onsubmit = (e) => {
    e.preventDefault();
    localStorage.setItem(KEYS.endpoint, $("endpoint").value.trim() || location.origin);
    localStorage.setItem(KEYS.key, $("api-key").value.trim());
    connect();
  };
  $("model").onchange = updateControls;
  $("lora").onchange = updateControls;
  $("prompt-form").onsubmit = (e) => {
    e.preventDefault();
    send();
  };
  $("prompt").onkeydown = (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      send();
    }
  };
  $("file").onchange = (e) => {
    addAttachments(e.target.files);
    e.target.value = "";
  };
  document.addEventListener("paste", (e) => {
    const files = [...(e.clipboardData?.files || [])];
    if (files.length) addAttachments(files);
  });
  document.addEventListener("dragover", (e) => {
    e.preventDefault();
    document.body.classList.add("dragging");
  });
  document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    document.body.classList.remove("dragging");
    addAttachments(e.dataTransfer?.files || []);
  });
  $("clear-history").onclick = async () => {
    await history.clear();
    document.querySelectorAll(".turn").forEach((n) => n.remove());
    $("empty").hidden = false;
  };
  history
    .load()
    .then((turns) => {
      for (const t of turns) renderTurn(t).finish(t.result);
    })
    .catch((err) => console.warn("history unavailable", err));
  connect();
}

init();
