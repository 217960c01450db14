// pf's page: loads the wasm build of crates/pf-web, picks a backend, and runs a model picked
// here (or given by the URL) on an image. Scriptable: ?model=URL&image=URL[&config=URL]
// [&backend=webgpu|cpu] runs without a click and writes the result as JSON into <pre id="result">.
import init, { Classifier, last_panic } from "./pkg/pf_web.js";

const $ = (id) => document.getElementById(id);

const state = { files: null, classifier: null, key: null };

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

// The backend to run on: the one asked for, else WebGPU when the browser gives an adapter.
// (Burn cannot report a missing adapter but by aborting, so the page asks first.)
async function chooseBackend(asked) {
  const adapter = navigator.gpu ? await navigator.gpu.requestAdapter().catch(() => null) : null;
  if (asked === "webgpu" && !adapter) throw new Error("WebGPU is not available in this browser (no adapter)");
  if (asked === "cpu" || !adapter) return { backend: "cpu", adapter: null };
  const info = adapter.info || {};
  return { backend: "webgpu", adapter: [info.vendor, info.architecture, info.description].filter(Boolean).join(" ") || "unnamed adapter" };
}

// A failure inside wasm arrives as "unreachable": the panic's own words are kept by the module.
function reason(e) {
  let panic = null;
  try { panic = last_panic(); } catch { /* the module itself did not load */ }
  return panic ? `${e.message || e}: ${panic}` : String(e.message || e);
}

// Loads the model on `backend`. Chosen automatically, WebGPU that does not give the CPU's
// results on the probe image (the module checks) gives way to the CPU model the module loaded
// to check it, and the result says why.
async function load({ backend, auto, weights, name, config, summary }) {
  const started = performance.now();
  const classifier = await Classifier.load(backend, weights, name, config, summary, auto);
  return { classifier, ms: performance.now() - started, fallback: classifier.fallback };
}

function show(outcome, loadMs, fallback) {
  const result = JSON.parse(outcome.json);
  result.ms.load = loadMs;
  const url = URL.createObjectURL(new Blob([outcome.overlay], { type: "image/png" }));
  $("pictures").innerHTML = "";
  const img = document.createElement("img");
  img.src = url;
  img.alt = `Grad-CAM of class ${result.gradcam.class}`;
  $("pictures").append(img);
  $("top").innerHTML = "<tr><th>class</th><th>label</th><th>probability</th></tr>" +
    result.top.map((r) => `<tr><td>${r.class}</td><td>${escape(r.label)}</td><td class="prob">${(100 * r.prob).toFixed(2)}%</td></tr>`).join("");
  $("timings").textContent = `${result.backend}: forward ${result.ms.forward.toFixed(1)} ms, ` +
    `Grad-CAM backward ${result.ms.backward.toFixed(1)} ms (model loaded in ${loadMs.toFixed(0)} ms)` +
    (fallback ? `; WebGPU was refused: ${fallback}` : "");
  return result;
}

function escape(text) {
  return text.replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
}

async function fetchBytes(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: ${response.status} ${response.statusText}`);
  return new Uint8Array(await response.arrayBuffer());
}

async function fetchText(url, optional = false) {
  const response = await fetch(url);
  if (optional && response.status === 404) return null;
  if (!response.ok) throw new Error(`${url}: ${response.status} ${response.statusText}`);
  return response.text();
}

// ?model=URL&image=URL[&config=URL][&backend=webgpu|cpu]: config defaults to the .json beside
// the model, and train.json beside it gives class names and the eval transform, as on the
// command line.
async function scripted(params) {
  const model = new URL(params.get("model"), location.href);
  const image = new URL(params.get("image"), location.href);
  const config = params.get("config") ? new URL(params.get("config"), location.href) : new URL(model.pathname.replace(/\.[^./]*$/, ".json"), model);
  const { backend, adapter } = await chooseBackend(params.get("backend") || "auto");
  status(`running on ${backend}${adapter ? ` (${adapter})` : ""}…`);
  const name = model.pathname.split("/").pop();
  const [weights, configText, summary, imageBytes] = await Promise.all([
    fetchBytes(model), fetchText(config), fetchText(new URL("train.json", model), true), fetchBytes(image),
  ]);
  const asked = params.get("backend") || "auto";
  const { classifier, ms, fallback } = await load({ backend, auto: asked === "auto", weights, name, config: configText, summary });
  const result = show(await classifier.run(imageBytes), ms, fallback);
  if (adapter) result.adapter = adapter;
  if (fallback) result.fallback = fallback;
  return result;
}

// The files picked by hand: the .bpk (or .pth, refused with how to convert it), its config
// .json, and train.json.
async function picked() {
  const files = [...(state.files || [])];
  const weights = files.find((f) => /\.(bpk|pth|pt)$/i.test(f.name));
  if (!weights) throw new Error("pick a model file (.bpk) first");
  const summary = files.find((f) => f.name === "train.json");
  const config = files.find((f) => f.name.endsWith(".json") && f !== summary);
  return {
    weights: new Uint8Array(await weights.arrayBuffer()),
    name: weights.name,
    config: config ? await config.text() : $("preset").value,
    summary: summary ? await summary.text() : undefined,
  };
}

async function interactive(imageFile) {
  $("result").textContent = "";
  try {
    const key = [...(state.files || [])].map((f) => f.name + f.size + f.lastModified).join() + $("preset").value + $("backend").value;
    if (!state.classifier || state.key !== key) {
      const { backend, adapter } = await chooseBackend($("backend").value);
      status(`loading the model on ${backend}${adapter ? ` (${adapter})` : ""}…`);
      state.classifier = await load({ backend, auto: $("backend").value === "auto", ...(await picked()) });
      state.key = key;
    }
    status("running…");
    const result = show(await state.classifier.classifier.run(new Uint8Array(await imageFile.arrayBuffer())), state.classifier.ms, state.classifier.fallback);
    if (state.classifier.fallback) result.fallback = state.classifier.fallback;
    $("result").textContent = JSON.stringify(result, null, 1);
    status(`${imageFile.name}: ${result.top[0].label}`);
  } catch (e) {
    state.classifier = null;
    $("result").textContent = JSON.stringify({ error: reason(e) });
    status(reason(e), true);
  }
}

async function main() {
  await init();
  for (const name of Classifier.presets()) $("preset").add(new Option(name, name));
  $("model-files").onchange = (e) => { state.files = e.target.files; };
  $("image-file").onchange = (e) => e.target.files[0] && interactive(e.target.files[0]);
  const drop = $("drop");
  drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
  drop.ondragleave = () => drop.classList.remove("over");
  drop.ondrop = (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    if (e.dataTransfer.files[0]) interactive(e.dataTransfer.files[0]);
  };
  const params = new URLSearchParams(location.search);
  if (params.has("check")) {
    // ?check: WebGPU against the CPU on the operations of pf's models.
    try {
      await chooseBackend("webgpu");
      status("comparing WebGPU with the CPU…");
      const check = JSON.parse(await Classifier.check_webgpu());
      const worst = check.filter((c) => !c.upstream).reduce((m, c) => Math.max(m, c.relative), 0);
      status(`WebGPU against the CPU: largest relative difference ${worst.toExponential(2)}`);
      $("result").textContent = JSON.stringify({ check }, null, 1);
    } catch (e) {
      status(reason(e), true);
      $("result").textContent = JSON.stringify({ error: reason(e) });
    }
    return;
  }
  if (!params.has("model") && !params.has("image")) {
    status("pick a model and an image");
    return;
  }
  try {
    if (!params.has("model") || !params.has("image")) throw new Error("the URL needs both model= and image=");
    const result = await scripted(params);
    status(`${result.backend}: ${result.top[0].label}`);
    $("result").textContent = JSON.stringify(result, null, 1);
  } catch (e) {
    status(reason(e), true);
    $("result").textContent = JSON.stringify({ error: reason(e) });
  }
}

main().catch((e) => {
  status(reason(e), true);
  $("result").textContent = JSON.stringify({ error: reason(e) });
});
