// mflux-server's web UI: one page, no build step, no network beyond this server.
"use strict";
const $ = (selector) => document.querySelector(selector);
const store = {
  get: (key, fallback) => { try { return JSON.parse(localStorage.getItem("mflux." + key)) ?? fallback; } catch { return fallback; } },
  set: (key, value) => localStorage.setItem("mflux." + key, JSON.stringify(value)),
};
const state = { models: [], loras: [], tasks: store.get("tasks", []), gallery: store.get("gallery", []), views: {}, source: null,
                followed: "", image: null, more: [], maskDirty: false, polling: null, strokes: [], info: {}, viewing: -1 };

async function api(path, options = {}) {
  const key = store.get("key", "");
  const headers = { ...(options.headers || {}), ...(key ? { Authorization: "Bearer " + key } : {}) };
  const response = await fetch(path, { ...options, headers });
  const body = response.headers.get("Content-Type")?.includes("json") ? await response.json() : null;
  if (response.status === 401) askForKey(key ? "The key was refused (unknown or revoked). Enter another." : null);
  if (!response.ok) throw Object.assign(new Error(body?.message || response.statusText), { status: response.status, body });
  return body;
}

// ---- the API key: sent as a header, and as a cookie for what cannot send one (EventSource, <img>) ------------
function setKey(key) {
  store.set("key", key);
  document.cookie = "mflux_key=" + (key ? encodeURIComponent(key) : "") + "; path=/; SameSite=Strict" + (key ? "" : "; max-age=0");
}
const KEY_NEEDED = "This server needs an API key. Ask its operator for one (mflux-server keys create NAME). It stays in this browser only.";
const KEY_OPTIONAL = "This server takes requests without a key. Enter one only if its operator gave you one: it stays in this browser only.";
function askForKey(why, needed = true) {
  const dialog = $("#key-dialog");
  $("#key-why").textContent = needed ? KEY_NEEDED : KEY_OPTIONAL;
  $("#key-error").textContent = why || "";
  if (!dialog.open) dialog.showModal();
  $("#key-input").focus();
}
function setupKey() {
  if (store.get("key", "")) setKey(store.get("key", ""));  // the cookie may have expired with the session
  $("#key-open").addEventListener("click", () => askForKey(null, state.info.keys_required !== false));
  $("#key-form").addEventListener("submit", () => { setKey($("#key-input").value.trim()); $("#key-input").value = ""; location.reload(); });
  $("#key-forget").addEventListener("click", () => { setKey(""); location.reload(); });
}

// ---- settings that persist -------------------------------------------------------------------------------------
function persist() {
  for (const el of document.querySelectorAll("[data-persist]")) {
    const saved = store.get("field." + el.id, null);
    if (saved !== null) { if (el.type === "checkbox") el.checked = saved; else el.value = saved; }
    el.addEventListener("change", () => store.set("field." + el.id, el.type === "checkbox" ? el.checked : el.value));
  }
}

// ---- models and the fields each can use ------------------------------------------------------------------------
async function loadModels() {
  try {
    const [models, info, loras] = await Promise.all([api("/api/models"), api("/api/info"),
      api("/api/loras").catch(() => ({ loras: [] }))]);
    state.info = info; state.loras = loras.loras;
    const signature = JSON.stringify([models.models.map((m) => [m.name, m.served]), state.loras.map((l) => l.name)]);
    if (signature === state.modelSignature) return;  // nothing changed: leave the menu (and an open one) alone
    state.modelSignature = signature; state.models = models.models;
    renderGallery();  // its Upscale button follows the served upscalers
    const select = $("#model"), wanted = select.value || store.get("field.model", null) || info.default_model;
    const served = state.models.filter((m) => m.served), others = state.models.filter((m) => !m.served);
    select.innerHTML = "";
    for (const [label, group] of [["Served now", served], ["Not served by any live worker", others]]) {
      if (!group.length) continue;
      const optgroup = document.createElement("optgroup");
      optgroup.label = label;
      for (const model of group) {
        const option = new Option(`${model.name} (${model.family_title})`, model.name);
        // While workers run, a model none of them serves would be refused (409): shown, not offered.
        option.disabled = !model.served && served.length > 0;
        optgroup.append(option);
      }
      select.append(optgroup);
    }
    const usable = state.models.filter((m) => m.served || !served.length);
    select.value = usable.some((m) => m.name === wanted) ? wanted : (served[0] || state.models[0])?.name;
    $("#server-note").textContent = info.warnings?.[0] || "";
    for (const [id, limit] of [["#width", "max_width"], ["#height", "max_height"], ["#steps", "max_steps"], ["#count", "max_count"]]) {
      if (info.limits?.[limit]) $(id).max = info.limits[limit];
    }
  } catch (error) { $("#server-note").textContent = "cannot reach the server: " + error.message; }
  applyModel();
}

function currentModel() { return state.models.find((m) => m.name === $("#model").value); }

// ---- LoRAs: rows of a library LoRA that fits the model, and its scale --------------------------------------------
const MAX_LORAS = 4;

function fittingLoras() {
  const model = currentModel();
  return (state.loras || []).filter((lora) => model && lora.families.includes(model.family));
}

function fillLoraSelect(select, wanted) {
  select.innerHTML = "";
  for (const lora of fittingLoras()) select.append(new Option(lora.name, lora.name));
  if (wanted && [...select.options].some((o) => o.value === wanted)) select.value = wanted;
}

function addLora(name, scale = 1) {
  const row = document.createElement("li");
  row.innerHTML = `<select aria-label="LoRA"></select>
    <input type="number" step="0.05" min="-4" max="4" aria-label="scale" title="scale, -4 to 4">
    <button type="button" class="ghost small" aria-label="remove this LoRA">×</button>`;
  const select = row.querySelector("select");
  fillLoraSelect(select, name);
  row.dataset.name = select.value;  // kept while another model hides the field, so it comes back with its model
  select.addEventListener("change", () => { row.dataset.name = select.value; });
  row.querySelector("input").value = String(scale);
  row.querySelector("button").addEventListener("click", () => { row.remove(); clearFieldError("loras"); applyLoras(); });
  for (const el of row.querySelectorAll("select, input")) el.addEventListener("input", () => clearFieldError("loras"));
  $("#lora-list").append(row);
  applyLoras();
  return row;
}

function applyLoras() {  // the model changed, or a row came or went: offer what fits, at most MAX_LORAS rows
  const fitting = fittingLoras(), names = fitting.map((lora) => lora.name);
  if (fitting.length) {  // with none the field is hidden and its rows wait for a model they fit
    for (const row of [...$("#lora-list").children]) {
      if (names.includes(row.dataset.name)) fillLoraSelect(row.querySelector("select"), row.dataset.name);
      else row.remove();  // a LoRA of another family: not carried over to a model it does not fit
    }
  }
  const count = $("#lora-list").children.length;
  $("#lora-add").disabled = !fitting.length || count >= MAX_LORAS;
  $("#lora-hint").textContent = !fitting.length ? "" : count >= MAX_LORAS ? `at most ${MAX_LORAS}`
    : `${fitting.length} in the library fit${fitting.length === 1 ? "s" : ""} this model`;
}

function chosenLoras() {
  return [...$("#lora-list").children].map((row) => ({
    name: row.querySelector("select").value, scale: Number(row.querySelector("input").value || 1) }));
}

// What a control map keeps of the image, in the model hint.
const CONTROL_WORDS = { canny: "edges", depth: "depth", pose: "poses", hed: "soft edges", mlsd: "straight lines" };

function applyModel() {
  const model = currentModel(), caps = model?.capabilities || {}, control = caps.control ? model.control : null;
  const can = { negative_prompt: caps.negative_prompt, guidance: caps.guidance, inpaint: caps.inpaint,
                image_to_image: caps.image_to_image, loras: caps.loras && fittingLoras().length > 0,
                image: caps.image_to_image || caps.edit || caps.inpaint || caps.control || caps.variation,
                variation: caps.variation, try_on: caps.try_on,
                more_images: (caps.edit || caps.variation) && (model?.max_reference_images || 0) > 1,
                control_strength: control?.default_strength != null, control_maps: Boolean(control?.maps),
                then_upscale: Boolean(upscaler()) && !caps.upscale };
  // Without a model (the server not reached yet, or not at all) no field is offered that a model may not take.
  for (const el of document.querySelectorAll("[data-needs]")) el.hidden = !model || !can[el.dataset.needs];
  $("#strength-field").hidden = !caps.image_to_image || (caps.edit && !$("#image_strength").dataset.touched);
  const hints = [];
  if (model) {
    hints.push(`${model.default_steps} steps by default`);
    if (caps.edit) hints.push("edits the image you give it");
    if (caps.inpaint) hints.push("paint the area to repaint");
    if (caps.variation) hints.push("draws variations of the image you give it");
    if (caps.try_on) hints.push("dresses the person in the garment you give it");
    if (control) hints.push(`follows the ${CONTROL_WORDS[control.types[0]] || control.types[0]} of the image you give it`);
    if (!model.served) hints.push("no live worker serves it");
  }
  $("#model-hint").textContent = hints.join(" · ");
  $("#steps").placeholder = model ? String(model.default_steps) : "model default";
  $("#mask-canvas").hidden = !caps.inpaint;
  $("#image-label").textContent = control ? "Control image" : caps.variation ? "Image prompt" : caps.try_on ? "Person"
    : "Init image";
  $("#drop").setAttribute("aria-label", `${control ? "control" : "init"} image: press Enter to choose a file, or drop or paste one`);
  if (control) {
    $("#control-map-kind").textContent = control.types[0];
    const strength = $("#control_strength");
    if (!strength.dataset.touched && control.default_strength != null) {
      strength.value = String(control.default_strength); strength.dispatchEvent(new Event("change"));
    }
  }
  applyUpscale();
  renderMore();
  applyLoras();
}

// ---- then upscale: each image becomes an upscale task of the one queue once the task is done ------------------
function applyUpscale() {  // the hint says what the upscale makes, and with which upscaler
  const factor = Number($("#upscale").value), width = Number($("#width").value), height = Number($("#height").value);
  const chosen = upscaler();
  $("#upscale-hint").textContent = !factor || !chosen || $("#upscale-field").hidden ? ""
    : `${width && height ? `${width * factor}×${height * factor}, ` : ""}with ${chosen.name}; the larger images follow in the queue`;
}

// ---- size presets ----------------------------------------------------------------------------------------------
function applyPreset() {
  if (!$("#preset").value || !$("#aspect").value) return;  // custom: the width and height as typed
  const side = Number($("#preset").value), [a, b] = $("#aspect").value.split(":").map(Number);
  const maxW = state.info.limits?.max_width || 2048, maxH = state.info.limits?.max_height || 2048;
  // The preset's pixel count at this aspect, scaled down to fit the server's largest width and height.
  const scale = Math.min(Math.sqrt((side * side) / (a * b)), maxW / a, maxH / b);
  $("#width").value = Math.min(maxW, Math.max(128, Math.floor((a * scale) / 16) * 16));
  $("#height").value = Math.min(maxH, Math.max(128, Math.floor((b * scale) / 16) * 16));
  store.set("field.width", $("#width").value); store.set("field.height", $("#height").value);
  clearFieldError("width"); clearFieldError("height");
}

function sizeIsCustom() {  // a size typed or taken from an image: the menus say "custom"
  for (const id of ["#preset", "#aspect"]) { $(id).value = ""; store.set("field." + id.slice(1), ""); }
}

// ---- init image and mask ---------------------------------------------------------------------------------------
function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result); reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function setImage(dataUrl) {
  state.image = dataUrl; state.maskDirty = false; state.strokes = []; $("#mask-undo").disabled = true;
  const img = $("#init-preview");
  img.onload = () => {
    const canvas = $("#mask-canvas");
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
    // Generate at the image's size (down to a multiple of 16, within 2048), as the server does without one.
    const scale = Math.min(1, 2048 / img.naturalWidth, 2048 / img.naturalHeight);
    $("#width").value = Math.max(128, Math.floor((img.naturalWidth * scale) / 16) * 16);
    $("#height").value = Math.max(128, Math.floor((img.naturalHeight * scale) / 16) * 16);
    sizeIsCustom();
  };
  if (dataUrl) img.src = dataUrl; else img.removeAttribute("src");
  for (const field of ["image", "mask", "control_image"]) clearFieldError(field);
  $("#form-error").textContent = "";
  $("#mask-wrap").hidden = !dataUrl; $("#image-tools").hidden = !dataUrl; $("#drop-text").hidden = !!dataUrl;
  renderMore();
}

function setGarment(dataUrl) {
  state.garment = dataUrl;
  const preview = $("#garment-preview");
  if (dataUrl) preview.src = dataUrl; else preview.removeAttribute("src");
  preview.hidden = !dataUrl; $("#garment-text").hidden = !!dataUrl; $("#garment-clear").hidden = !dataUrl;
  clearFieldError("garment_image");
}

// A drop zone: Enter or Space opens its file input; a chosen or dropped image is read and handed to take().
function acceptImages(drop, file, take) {
  drop.addEventListener("keydown", (e) => {
    if ((e.key === "Enter" || e.key === " ") && e.target === drop) { e.preventDefault(); file.click(); }
  });
  file.addEventListener("change", async () => file.files[0] && take(await readFile(file.files[0])));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", async (e) => {
    e.preventDefault(); e.stopPropagation(); drop.classList.remove("over");
    const dropped = e.dataTransfer.files[0];
    if (dropped?.type.startsWith("image/")) take(await readFile(dropped));
  });
}

// ---- more images: an edit's further references, or a variation's further image prompts (each with its strength)
function moreAllowed() {  // how many besides the picked image the model takes
  return Math.max((currentModel()?.max_reference_images || 1) - 1, 0);
}

function renderMore() {
  const model = currentModel(), variation = Boolean(model?.capabilities?.variation), list = $("#more-list");
  const room = moreAllowed() - state.more.length;
  list.replaceChildren(...state.more.map((entry, n) => {
    const item = document.createElement("li"), img = document.createElement("img");
    img.src = entry.dataUrl; img.alt = `image ${n + 2}`;
    const middle = document.createElement("span");
    if (variation) {  // its own strength, "model default" (1) until moved, as the first image's
      const label = document.createElement("label"), out = document.createElement("output");
      const slider = Object.assign(document.createElement("input"), { type: "range", min: "0", max: "1", step: "0.05",
                                                                      value: String(entry.strength ?? 1) });
      slider.setAttribute("aria-label", `strength of image ${n + 2}`);
      out.textContent = entry.strength == null ? "model default" : entry.strength.toFixed(2);
      slider.addEventListener("input", () => { entry.strength = Number(slider.value); out.textContent = entry.strength.toFixed(2); });
      label.append(`Strength of image ${n + 2} `, out, slider); middle.append(label);
    } else middle.textContent = `image ${n + 2}`;
    const remove = Object.assign(document.createElement("button"), { type: "button", className: "ghost",
                                                                     textContent: "Remove" });
    remove.setAttribute("aria-label", `remove image ${n + 2}`);
    remove.addEventListener("click", () => { state.more.splice(n, 1); renderMore(); $("#more-drop").focus(); });
    item.append(img, middle, remove);
    return item;
  }));
  $("#more-drop").hidden = room <= 0 || !state.image;
  $("#more-room").textContent = `(${state.more.length} of ${moreAllowed()})`;
  $("#more-hint").textContent = !state.image ? "Pick the first image above; then add more here."
    : variation ? "Each image prompt steers the variation; the first is the image above."
    : "References in order after the image above: \u201cthe cat from the first on the sofa of the second\u201d.";
  clearFieldError("images");
}

function addMore(dataUrl) {
  if (state.more.length < moreAllowed()) state.more.push({ dataUrl, strength: null });
  renderMore();
}

function setupMoreInput() {
  const drop = $("#more-drop"), file = $("#more-file");
  drop.addEventListener("click", () => file.click());
  acceptImages(drop, file, (dataUrl) => { addMore(dataUrl); file.value = ""; });
}

function setupGarmentInput() {
  const drop = $("#garment-drop"), file = $("#garment-file");
  drop.addEventListener("click", () => file.click());
  acceptImages(drop, file, setGarment);
  $("#garment-clear").addEventListener("click", () => { setGarment(null); drop.focus(); });
}

function setupImageInput() {
  const drop = $("#drop"), file = $("#image-file");
  drop.addEventListener("click", (e) => { if (!state.image && e.target.id !== "mask-canvas") file.click(); });
  acceptImages(drop, file, setImage);
  document.addEventListener("paste", async (e) => {
    const item = [...(e.clipboardData?.items || [])].find((i) => i.type.startsWith("image/"));
    if (item) setImage(await readFile(item.getAsFile()));
  });
  // Removing the first image moves the next one up, so what is listed is always what is sent.
  $("#image-clear").addEventListener("click", () => setImage(state.more.shift()?.dataUrl || null));
  $("#mask-clear").addEventListener("click", () => {
    const canvas = $("#mask-canvas"), ctx = canvas.getContext("2d");
    state.strokes.push(ctx.getImageData(0, 0, canvas.width, canvas.height));
    ctx.clearRect(0, 0, canvas.width, canvas.height); state.maskDirty = false; $("#mask-undo").disabled = false;
  });
  $("#mask-undo").addEventListener("click", () => {
    const canvas = $("#mask-canvas"), before = state.strokes.pop();
    if (before) canvas.getContext("2d").putImageData(before, 0, 0);
    $("#mask-undo").disabled = state.strokes.length === 0;
  });
  for (const [input, output] of [["#image_strength", "#strength-out"], ["#control_strength", "#control-strength-out"],
                                 ["#prompt_strength", "#prompt-strength-out"]]) {
    const strength = $(input), out = $(output);
    // The image prompt's strength says "model default" until it is moved: only then is it sent.
    const show = () => { if (input !== "#prompt_strength" || strength.dataset.touched) out.textContent = Number(strength.value).toFixed(2); };
    strength.addEventListener("input", () => { strength.dataset.touched = "1"; show(); });
    strength.addEventListener("change", show); show();
  }
  const canvas = $("#mask-canvas"); let painting = false, last = null;
  const paint = (e) => {
    if (!painting) return;
    const rect = canvas.getBoundingClientRect(), scale = canvas.width / rect.width;
    const ctx = canvas.getContext("2d"), at = [(e.clientX - rect.left) * scale, (e.clientY - rect.top) * scale];
    // A round-capped line from the last point: fast moves leave a stroke, not a trail of dots.
    ctx.strokeStyle = "#ffffff"; ctx.lineCap = ctx.lineJoin = "round"; ctx.lineWidth = Number($("#brush").value) * scale;
    ctx.beginPath();
    if (last) { ctx.moveTo(...last); ctx.lineTo(...at); ctx.stroke(); }
    else { ctx.fillStyle = "#ffffff"; ctx.arc(...at, ctx.lineWidth / 2, 0, Math.PI * 2); ctx.fill(); }  // a dab
    last = at; state.maskDirty = true;
  };
  canvas.addEventListener("pointerdown", (e) => {
    // Each stroke keeps the mask as it was before, so Undo can step back (a few MB per stroke at most: keep 20).
    state.strokes.push(canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height));
    if (state.strokes.length > 20) state.strokes.shift();
    $("#mask-undo").disabled = false;
    painting = true; canvas.setPointerCapture(e.pointerId); paint(e);
  });
  canvas.addEventListener("pointermove", paint);
  canvas.addEventListener("pointerup", () => { painting = false; last = null; });
}

function maskDataUrl() {
  // The server wants white = repaint on black, at the image's exact size.
  const source = $("#mask-canvas"), out = document.createElement("canvas");
  out.width = source.width; out.height = source.height;
  const ctx = out.getContext("2d"); ctx.fillStyle = "#000"; ctx.fillRect(0, 0, out.width, out.height); ctx.drawImage(source, 0, 0);
  return out.toDataURL("image/png");
}

// ---- submit ----------------------------------------------------------------------------------------------------
function clearErrors() {
  for (const el of document.querySelectorAll(".error")) el.textContent = "";
  for (const el of document.querySelectorAll(".invalid")) el.classList.remove("invalid");
}

function clearFieldError(name) {
  const slot = document.querySelector(`[data-error-for="${name}"]`);
  if (slot) slot.textContent = "";
  document.getElementById(name)?.classList.remove("invalid");
}

const FIELD_NAMES = { width: "Width", height: "Height" };  // two fields share one place under the size pair

function flatErrors(errors, path = "", into = {}) {  // {loras: {0: {scale: [...]}}} as {"loras.0.scale": [...]}
  for (const [key, value] of Object.entries(errors || {})) {
    const name = key === "_schema" ? path : path ? `${path}.${key}` : key;
    if (value && !Array.isArray(value) && typeof value === "object") flatErrors(value, name, into);
    else into[name] = value;
  }
  return into;
}

function showError(error) {
  const errors = flatErrors(error.body?.errors?.json || error.body?.errors?.form || error.body?.errors?.query);
  if (!Object.keys(errors).length && error.body?.field) errors[error.body.field] = [error.message];  // e.g. 409 on model
  let placed = false;
  for (const [field, messages] of Object.entries(errors)) {
    const [name, index] = field.split("."), slot = document.querySelector(`[data-error-for="${name}"]`);
    let text = (Array.isArray(messages) ? messages.join(" ") : JSON.stringify(messages));
    if (name === "images" && /^\d+$/.test(index || "")) text = `Image ${Number(index) + 1}: ${text}`;
    if (slot) {
      slot.textContent = FIELD_NAMES[name] ? `${FIELD_NAMES[name]}: ${text}` : text;
      placed = true; document.getElementById(name)?.classList.add("invalid");
    }
  }
  if (!placed) $("#form-error").textContent = error.message;
  if (error.body?.code === "model_not_served") loadModels();  // a worker went away: the menu catches up
}

async function submit(event) {
  event.preventDefault(); clearErrors();
  const model = currentModel(), caps = model?.capabilities || {}, body = { prompt: $("#prompt").value.trim() };
  const number = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  Object.assign(body, { model: model?.name, width: number("#width"), height: number("#height"), steps: number("#steps"),
    count: number("#count"), format: $("#format").value, quality: number("#quality"), priority: $("#priority").checked });
  if (caps.guidance) body.guidance = number("#guidance");
  if (caps.negative_prompt && $("#negative_prompt").value.trim()) body.negative_prompt = $("#negative_prompt").value;
  if (!$("#seed-random").checked) body.seed = number("#seed");
  if (caps.loras && !$("#loras-field").hidden && $("#lora-list").children.length) body.loras = chosenLoras();
  if (state.image && caps.control) {  // a control model takes the picked image as its control image
    body.control_image = state.image;
    if (!$("#control-strength-field").hidden) body.control_strength = Number($("#control_strength").value);
    if ($("#control_map").checked && !$("#control_map").closest("[data-needs]").hidden) body.control_preprocess = false;
  } else if (state.image && (caps.image_to_image || caps.edit || caps.inpaint || caps.variation)) {
    body.image = state.image;
    if (caps.inpaint) body.mask = maskDataUrl();
    else if (caps.image_to_image && !$("#strength-field").hidden) body.image_strength = Number($("#image_strength").value);
    if (caps.variation && $("#prompt_strength").dataset.touched) body.image_strengths = [Number($("#prompt_strength").value)];
    const more = $("#more-field").hidden ? [] : state.more;
    if (more.length && !caps.inpaint) {  // several images: sent as images, in order, the picked one first
      body.images = [body.image, ...more.map((entry) => entry.dataUrl)]; delete body.image;
      if (caps.variation && (body.image_strengths || more.some((entry) => entry.strength != null))) {
        // One strength per image prompt once any is set; an unmoved one keeps mflux's default, 1.
        body.image_strengths = [body.image_strengths?.[0] ?? 1, ...more.map((entry) => entry.strength ?? 1)];
      }
    }
  }
  if (caps.try_on && state.garment) body.garment_image = state.garment;
  if (!$("#upscale-field").hidden && $("#upscale").value) body.upscale = { factor: Number($("#upscale").value), upscaler: upscaler()?.name };
  for (const key of Object.keys(body)) if (body[key] === undefined) delete body[key];
  const button = $("#generate"); button.disabled = true;
  try {
    const task = await api("/api/generate", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    state.tasks.push({ id: task.task_id, prompt: body.prompt, format: task.format, count: task.count, seed: task.seed });
    state.views[task.task_id] = { ...task, position: task.pos, seenAt: Date.now() };
    saveTasks(); renderQueue(); follow();
  } catch (error) { showError(error); } finally { button.disabled = false; }
}

// ---- queue: live events, polling fallback ----------------------------------------------------------------------
function saveTasks() { store.set("tasks", state.tasks); store.set("gallery", state.gallery); }

function follow() {
  const ids = state.tasks.map((t) => t.id);
  if (!ids.length) { if (state.source) { state.source.close(); state.source = null; state.followed = ""; } return; }
  if (!window.EventSource || state.polling) return poll();
  // A stream already following every task of ours stays open: a task that ended only stops mattering to it.
  // It is reopened when a task is added (it reopened at every end and every submit: 26 times in one visit).
  const followed = new Set(state.followed.split(","));
  if (state.source && ids.every((id) => followed.has(id))) return;
  if (state.source) state.source.close();
  state.followed = ids.join(",");
  const source = new EventSource("/api/events?task_ids=" + encodeURIComponent(state.followed));
  state.source = source;
  for (const kind of ["status", "progress", "preview", "done", "error", "deleted"]) {
    source.addEventListener(kind, (message) => onEvent(kind, JSON.parse(message.data)));
  }
  source.onerror = () => { if (source.readyState === EventSource.CLOSED) { state.polling = true; poll(); } };
}

async function poll() {
  for (const task of [...state.tasks]) {
    try {
      const view = await api("/api/tasks/" + task.id);
      onEvent(view.status === "done" ? "done" : view.status === "error" ? "error" : "status",
              { ...view, position: view.pos, progress: view.progress });
    } catch (error) { if (error.status === 404) onEvent("deleted", { task_id: task.id }); }
  }
  if (state.tasks.length) setTimeout(poll, 1000);
}

function onEvent(kind, data) {
  const task = state.tasks.find((t) => t.id === data.task_id);
  if (!task) return;
  const view = (state.views[task.id] = { ...(state.views[task.id] || {}), ...data, seenAt: Date.now() });
  if (kind === "progress" && data.step !== undefined) view.progress = { image: data.image, count: data.count, step: data.step, steps: data.steps };
  if (kind === "preview") view.preview = `/api/tasks/${task.id}/preview?step=${data.image}-${data.step}`;
  if (kind === "done") {
    const images = [];
    for (let index = 0; index < task.count; index++) {
      images.push({ task: task.id, index, prompt: task.prompt, seed: (view.seed ?? task.seed) + index, format: task.format,
        url: `/api/image?task_id=${task.id}&index=${index}&delete=false` });
    }
    state.gallery.unshift(...images);  // newest task first, its images in seed order
    dropTask(task.id); renderGallery();
    for (const [index, id] of (data.upscale?.task_ids || []).entries()) {  // asked with it: now queued, one per image
      if (!state.tasks.some((t) => t.id === id)) {
        state.tasks.push({ id, prompt: task.prompt, format: task.format, count: 1, seed: images[index]?.seed ?? task.seed });
      }
    }
    if (data.upscale?.task_ids?.length) { saveTasks(); follow(); }
  } else if (kind === "deleted" || data.status === "canceled") {
    dropTask(task.id);
  } else if (kind === "error") {
    view.failed = data.error || "failed";
  }
  renderQueue();
}

function dropTask(id) {
  state.tasks = state.tasks.filter((t) => t.id !== id); delete state.views[id]; saveTasks(); follow();
}

// The forecast as a person reads it, counting down: "~40 s, 30–55 s" (four tasks in five finish inside the range).
function forecastText(view) {
  const elapsed = (Date.now() - (view.seenAt || Date.now())) / 1000;
  const left = (seconds) => Math.max(0, (seconds ?? 0) - elapsed).toFixed(0);
  const [low, high] = (view.wait_range || []).map(left);
  return `~${left(view.wait_remaining)} s` + (low !== undefined && low !== high ? `, ${low}–${high} s` : "");
}

function renderQueue() {
  const list = $("#queue"); list.innerHTML = "";
  for (const task of state.tasks) {
    const view = state.views[task.id] || {}, li = document.createElement("li");
    li.dataset.task = task.id;
    const p = view.progress || {}, total = (p.count || task.count) * (p.steps || 1);
    const done = view.status === "processing" ? ((p.image || 1) - 1) * (p.steps || 1) + (p.step || 0) : 0;
    const forecast = `<span class="nowrap countdown" title="forecast; four tasks in five finish within the range">${forecastText(view)}</span>`;
    let meta = view.failed ? `<span class="failed">${escapeHtml(view.failed)}</span>`
      : view.note ? `<span class="waiting-note">${escapeHtml(view.note)}</span>`
      : view.status === "processing" ? `image ${p.image || 1}/${p.count || task.count} · step ${p.step || 0}/${p.steps || "?"} · ${forecast}`
      : `waiting · ${view.position ?? "?"} ahead · ${forecast}`;
    li.innerHTML = `${view.preview ? `<img class="thumb" alt="preview" src="${view.preview}">` : '<div class="thumb" aria-hidden="true"></div>'}
      <div><div class="prompt">${escapeHtml(task.prompt)}</div><div class="meta">${meta}</div>
      <div class="bar" role="progressbar" aria-valuemin="0" aria-valuemax="100" aria-valuenow="${Math.round((done / total) * 100)}"><span style="width:${(done / total) * 100}%"></span></div></div>
      <button type="button" class="small">${view.failed ? "Dismiss" : "Cancel"}</button>`;
    li.querySelector("button").addEventListener("click", () => cancel(task.id, !!view.failed));
    list.append(li);
  }
  $("#queue-empty").hidden = state.tasks.length > 0;
}

async function cancel(id, dismiss) {
  try { await api("/api/tasks/" + id, { method: "DELETE" }); } catch (error) { if (error.status !== 404) return showError(error); }
  if (dismiss) { await api("/api/tasks/" + id, { method: "DELETE" }).catch(() => {}); }
  dropTask(id); renderQueue();
}

setInterval(() => {  // the forecast counts down between events
  for (const el of document.querySelectorAll("#queue li")) {
    const view = state.views[el.dataset.task], counter = el.querySelector(".countdown");
    if (view && counter) counter.textContent = forecastText(view);
  }
}, 1000);

// ---- gallery ---------------------------------------------------------------------------------------------------
function renderGallery() {
  const list = $("#gallery"); list.innerHTML = "";
  for (const item of state.gallery) {
    const li = document.createElement("li");
    li.innerHTML = `<img src="${item.url}" alt="${escapeHtml(item.prompt)}" loading="lazy">
      <div class="actions"><a class="button small" href="${item.url}" download="${fileName(item)}" data-act="download">Download</a>
      <button type="button" class="small" data-act="init">Use as init</button><button type="button" class="small" data-act="seed">Reuse seed</button>
      ${upscaler() ? '<button type="button" class="small" data-act="upscale">Upscale 2×</button>' : ""}
      <button type="button" class="small" data-act="delete">Delete</button></div>
      <div class="caption">seed ${item.seed} · ${escapeHtml(item.prompt)}</div>`;
    li.querySelector("img").addEventListener("click", () => view(item));
    li.querySelector('[data-act="download"]').addEventListener("click", (e) => { e.preventDefault(); download(item); });
    li.querySelector('[data-act="init"]').addEventListener("click", async () => {
      const blob = await (await fetch(item.url)).blob(); setImage(await readFile(blob)); window.scrollTo({ top: 0, behavior: "smooth" });
    });
    li.querySelector('[data-act="seed"]').addEventListener("click", () => {
      $("#seed").value = item.seed; $("#seed-random").checked = false; $("#seed").dispatchEvent(new Event("change"));
      $("#seed-random").dispatchEvent(new Event("change"));
    });
    li.querySelector('[data-act="delete"]').addEventListener("click", () => removeImage(item));
    li.querySelector('[data-act="upscale"]')?.addEventListener("click", () => upscale(item));
    list.append(li);
  }
  $("#gallery-empty").hidden = state.gallery.length > 0;
}

function upscaler() {  // the first upscaler a live worker serves, if any
  return (state.models || []).find((m) => m.capabilities?.upscale && m.served);
}

async function upscale(item) {  // a task of the one queue: it shows in the queue and lands in the gallery
  try {
    const task = await api("/api/upscale", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ task_id: item.task, index: item.index, factor: 2, upscaler: upscaler()?.name, seed: item.seed }) });
    state.tasks.push({ id: task.task_id, prompt: task.prompt || item.prompt, format: task.format, count: 1,
                       seed: task.seed });
    state.views[task.task_id] = { ...task, position: task.pos, seenAt: Date.now() };
    saveTasks(); renderQueue(); follow();
  } catch (error) { showError(error); }
}

async function removeImage(item) {
  state.gallery = state.gallery.filter((g) => g !== item);
  if (!state.gallery.some((g) => g.task === item.task)) await api("/api/tasks/" + item.task, { method: "DELETE" }).catch(() => {});
  saveTasks(); renderGallery();
}

function fileName(item) {
  const ext = { JPEG: "jpg", PNG: "png", WEBP: "webp" }[item.format] || "png";
  return `mflux-${new Date().toISOString().slice(0, 10)}-${item.seed}-${item.task.slice(0, 6)}.${ext}`;
}

async function download(item) {
  // Through a blob: the image's own Content-Disposition names the file after the task, and it wins over the
  // link's download attribute; a blob: URL has no headers, so the dated, seed-stamped name is used.
  const response = await fetch(item.url);
  if (!response.ok) return dropMissing([item.task]);
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await response.blob()); link.download = fileName(item);
  document.body.append(link); link.click(); link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}

function view(item) {
  state.viewing = state.gallery.indexOf(item);
  $("#viewer-img").src = item.url; $("#viewer-caption").textContent = `seed ${item.seed} · ${item.prompt}`;
  $("#viewer-prev").disabled = state.viewing <= 0; $("#viewer-next").disabled = state.viewing >= state.gallery.length - 1;
  if (!$("#viewer").open) $("#viewer").showModal();
  showProvenance(item);
}

async function showProvenance(item) {  // read back from the stored bytes: generation data and Content Credentials
  const list = $("#provenance-list");
  list.replaceChildren();
  const add = (term, value) => {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = term; dd.textContent = value; list.append(dt, dd);
  };
  try {
    const found = await api(`/api/tasks/${item.task}/provenance?index=${item.index}`);
    if (state.gallery[state.viewing] !== item) return;  // the viewer moved on meanwhile
    const data = found.generation_data || {}, credentials = found.content_credentials;
    add("Marked as", found.digital_source_type ? found.digital_source_type.split("/").pop() : "not marked");
    add("Prompt", data.prompt ?? "withheld (private)");
    if (data.negative_prompt) add("Negative prompt", data.negative_prompt);
    add("Model", `${data.model} · seed ${data.seed} · ${data.steps} steps · ${data.width}×${data.height}`);
    if (data.loras?.length) add("LoRAs", data.loras.map((l) => `${l.name} ${l.scale}`).join(", "));
    if (data.inputs?.length) add("Inputs", data.inputs.join(", "));
    add("Software", data.software || "");
    add("Content Credentials", !credentials ? "none" : credentials.state +
      (credentials.failures.length ? ` (${credentials.failures.join(", ")})` : ""));
  } catch (error) {
    add("Could not read it", error.message);
  }
}

function step(by) {
  const next = state.gallery[state.viewing + by];
  if (next) view(next);
}

function setupViewer() {
  const dialog = $("#viewer");
  $("#viewer-close").addEventListener("click", () => dialog.close());
  $("#viewer-prev").addEventListener("click", () => step(-1));
  $("#viewer-next").addEventListener("click", () => step(1));
  $("#viewer-download").addEventListener("click", (e) => { e.preventDefault(); download(state.gallery[state.viewing]); });
  dialog.addEventListener("click", (e) => { if (e.target === dialog) dialog.close(); });  // the backdrop
  dialog.addEventListener("keydown", (e) => {
    if (e.key === "ArrowLeft") step(-1);
    if (e.key === "ArrowRight") step(1);
  });
}

function dropMissing(taskIds) {  // images whose task the server no longer has (deleted elsewhere, or expired)
  state.gallery = state.gallery.filter((g) => !taskIds.includes(g.task));
  saveTasks(); renderGallery();
}

async function checkGallery() {
  const gone = [];
  for (const id of new Set(state.gallery.map((g) => g.task))) {
    try { await api("/api/tasks/" + id); } catch (error) { if (error.status === 404 || error.status === 410) gone.push(id); }
  }
  if (gone.length) dropMissing(gone);
}

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

// ---- start -----------------------------------------------------------------------------------------------------
setupKey();
persist();
$("#preset").addEventListener("change", applyPreset); $("#aspect").addEventListener("change", applyPreset);
for (const id of ["#preset", "#aspect", "#width", "#height", "#upscale"]) {  // after applyPreset: the size it set
  $(id).addEventListener("change", applyUpscale); $(id).addEventListener("input", applyUpscale);
}
$("#model").addEventListener("change", () => { clearFieldError("model"); $("#form-error").textContent = ""; applyModel(); });
$("#form").addEventListener("submit", submit);
$("#form").addEventListener("keydown", (e) => {  // Ctrl+Enter (or Cmd+Enter) submits from any field
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); $("#form").requestSubmit(); }
});
for (const el of document.querySelectorAll("#form input, #form textarea, #form select")) {
  el.addEventListener("input", () => { clearFieldError(el.id); if (el.id === "width" || el.id === "height") sizeIsCustom(); });
}
$("#seed").addEventListener("input", () => {  // a typed seed is meant: it is sent, not replaced by a random one
  if ($("#seed").value !== "" && $("#seed-random").checked) {
    $("#seed-random").checked = false; $("#seed-random").dispatchEvent(new Event("change"));
  }
});
$("#lora-add").addEventListener("click", () => { const row = addLora(); row.querySelector("select").focus(); });
setupViewer();
setupImageInput();
setupGarmentInput();
setupMoreInput();
loadModels().then(() => { if (!$("#width").value) applyPreset(); applyUpscale(); });
setInterval(loadModels, 15_000);  // workers come and go: the menu follows without a reload
renderQueue(); renderGallery(); checkGallery();
(async () => {  // a reload restores this browser's queue: refresh each task, then follow them live
  for (const task of [...state.tasks]) {
    try { const v = await api("/api/tasks/" + task.id); state.views[task.id] = { ...v, position: v.pos, seenAt: Date.now() }; if (v.status === "done") onEvent("done", v); }
    catch (error) { if (error.status === 404) dropTask(task.id); }
  }
  renderQueue(); follow();
})();
