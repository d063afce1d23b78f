// The viewer's page: a thin layer over NiiVue (views, window/level, drawing layer, NIfTI) and the server's
// HTTP API (docs/CONTRACT.md, "Viewer"). No segmentation, geometry or label logic lives here.
//
// Frames: the server serves the CT reoriented to the slice frame's axes, so a voxel (i, j, k) of the
// served file is pixel (x = i, y = j) of slice k, the frame of every prompt and of labels.raw. NiiVue's
// callbacks report voxels in its RAS-reoriented order; vol.permRAS maps them back to the file's order.
import { Niivue, SLICE_TYPE, SHOW_RENDER, DRAG_MODE } from "./node_modules/@niivue/niivue/dist/index.js";
import { zipSync } from "./node_modules/fflate/esm/browser.js";

const COLORS = [   // BTCV ids 1..13
  [220, 20, 60], [255, 165, 0], [255, 215, 0], [0, 160, 0], [0, 255, 255], [190, 80, 40], [255, 105, 180],
  [255, 0, 0], [40, 80, 255], [138, 43, 226], [255, 255, 0], [0, 255, 0], [160, 0, 160],
];
const PRESETS = { abdomen: [400, 40], bone: [1800, 400], lung: [1500, -600] };   // [W, L]
const ORGAN_KEYS = ["1", "2", "3", "4", "5", "6", "7", "8", "9", "0", "-", "=", "["];
const CLICK_PX = 4;   // a left press and release closer than this (CSS px) is a click (a point), else a box

const $ = (id) => document.getElementById(id);
const state = {
  config: null, vol: null, organs: [], organ: null, status: null, version: -1, preset: "abdomen",
  prompt: null,            // {organ, k, box?}: a box on its way to the server (the slices' prompts come from status)
  press: null, band: null, // left press position (CSS px) and the rubber band while dragging
  tool: "prompt",          // prompt | brush | eraser
  before: null,            // the drawing layer before a brush / eraser stroke
  walking: false, ready: false,
};

// ---- messages: one plain sentence for every error, progress for every long step -----------------------------
function showError(text) {
  const el = $("error");
  el.textContent = String(text).split("\n")[0];
  el.hidden = false;
}
function clearError() { $("error").hidden = true; }
function say(text) { $("message").textContent = text; }
function progress(fraction, text) {   // fraction: 0..1, null = indeterminate; text null hides
  const box = $("progress");
  if (text === null) { box.hidden = true; return; }
  box.hidden = false;
  $("progress-bar").classList.toggle("indeterminate", fraction === null);
  $("progress-fill").style.width = fraction === null ? "" : `${Math.round(100 * Math.min(1, fraction))}%`;
  $("progress-text").textContent = text;
}
async function step(text, fn) {   // a long step: progress shown, errors said in one sentence
  clearError();
  progress(null, text);
  try { return await fn(); }
  catch (err) { showError(err.message || String(err)); return undefined; }
  finally { progress(null, null); }
}
window.addEventListener("unhandledrejection", (e) => { e.preventDefault(); showError(e.reason?.message || String(e.reason)); });

// ---- the API ---------------------------------------------------------------------------------------------------
async function api(method, path, body, raw = false) {
  const init = { method, headers: {} };
  if (body instanceof Blob) { init.body = body; init.headers["Content-Type"] = "application/octet-stream"; }
  else if (body !== undefined) { init.body = JSON.stringify(body); init.headers["Content-Type"] = "application/json"; }
  let r;
  try { r = await fetch(path, init); }
  catch { throw new Error("The viewer's server did not answer; is viewer.py still running?"); }
  if (!r.ok) {
    let text = `The server answered ${r.status}.`;
    try { text = (await r.json()).error || text; } catch { /* not JSON */ }
    throw new Error(text.charAt(0).toUpperCase() + text.slice(1));
  }
  return raw ? r : r.json();
}
const volPath = (rest = "") => `/api/volumes/${state.vol.id}${rest}`;
const organPath = (rest) => volPath(`/organs/${state.organ}${rest}`);

// ---- NiiVue ----------------------------------------------------------------------------------------------------
const nv = new Niivue({
  backColor: [0, 0, 0, 1], isColorbar: false, show3Dcrosshair: false,
  isRadiologicalConvention: true,       // patient right on screen left, as the slice frame
  isNearestInterpolation: true,         // voxel edges on screen are where clicks land
  dragAndDropEnabled: false, viewModeHotKey: "", clipPlaneHotKey: "", cycleClipPlaneHotKey: "",
  multiplanarShowRender: SHOW_RENDER.NEVER, dragMode: DRAG_MODE.windowing, logLevel: "warn",
});
// a setter, not a constructor option (the constructor drops it): left = prompts (callback only), ctrl+left =
// crosshair, right = window/level, middle = pan
const MOUSE_PROMPT = {
  leftButton: { primary: DRAG_MODE.callbackOnly, withShift: DRAG_MODE.callbackOnly, withCtrl: DRAG_MODE.crosshair },
  rightButton: DRAG_MODE.windowing, centerButton: DRAG_MODE.pan,
};
const MOUSE_DRAW = {   // NiiVue draws where a crosshair click goes: the brush and the eraser follow the left button
  leftButton: { primary: DRAG_MODE.crosshair, withShift: DRAG_MODE.crosshair, withCtrl: DRAG_MODE.crosshair },
  rightButton: DRAG_MODE.windowing, centerButton: DRAG_MODE.pan,
};
nv.setMouseEventConfig(MOUSE_PROMPT);
const LAYOUT = [
  { sliceType: SLICE_TYPE.AXIAL, position: [0, 0, 0.64, 1] },
  { sliceType: SLICE_TYPE.CORONAL, position: [0.64, 0, 0.36, 0.5] },
  { sliceType: SLICE_TYPE.SAGITTAL, position: [0.64, 0.5, 0.36, 0.5] },
];
const back = () => nv.volumes[0];

// voxel orders: NiiVue's RAS order <-> the served file's (= the slice frame's (x, y, k))
function rasToFile(v) {
  const vol = back(), out = [0, 0, 0];
  for (let p = 0; p < 3; p++) {
    const a = Math.abs(vol.permRAS[p]) - 1;
    out[a] = vol.permRAS[p] < 0 ? vol.hdr.dims[a + 1] - 1 - v[p] : v[p];
  }
  return out.map(Math.round);
}
function fileToRas(s) {
  const vol = back(), out = [0, 0, 0];
  for (let p = 0; p < 3; p++) {
    const a = Math.abs(vol.permRAS[p]) - 1;
    out[p] = vol.permRAS[p] < 0 ? vol.hdr.dims[a + 1] - 1 - s[a] : s[a];
  }
  return out;
}
const crosshairFile = () => rasToFile(nv.frac2vox(nv.scene.crosshairPos));
const currentSlice = () => crosshairFile()[2];
function fileToScreen(s) {   // a (fractional) voxel of the served file -> CSS px on the axial tile, or null
  const r = nv.frac2canvasPosWithTile(nv.vox2frac(fileToRas(s)), SLICE_TYPE.AXIAL);
  if (!r || r.tileIndex < 0 || nv.screenSlices[r.tileIndex].axCorSag !== SLICE_TYPE.AXIAL) return null;
  return [r.pos[0] / nv.uiData.dpr, r.pos[1] / nv.uiData.dpr];
}
function goToSlice(k) {
  const ras = fileToRas([...crosshairFile().slice(0, 2), k]), now = nv.frac2vox(nv.scene.crosshairPos);
  nv.moveCrosshairInVox(ras[0] - now[0], ras[1] - now[1], ras[2] - now[2]);
}

// ---- the label map on NiiVue's drawing layer ------------------------------------------------------------------
// labels.raw holds slices first..last of the label map, (n, H, W) uint8: byte x + y * W of slice k is voxel
// (x, y, k) of the served file. drawBitmap is in NiiVue's RAS order.
function drawSlices(first, bytes) {
  const vol = back(), [, W, H] = vol.hdr.dims, n = bytes.length / (W * H), bmp = nv.drawBitmap;
  const [rx, ry, rz] = vol.permRAS, [dx, dy] = [vol.dimsRAS[1], vol.dimsRAS[2]];
  if (rx === -1 && ry === -2 && rz === 3) {        // the served orientation (LPS): each slice reversed
    for (let s = 0; s < n; s++) bmp.set(bytes.subarray(s * W * H, (s + 1) * W * H).slice().reverse(), (first + s) * W * H);
  } else {                                           // any other: voxel by voxel through permRAS
    for (let s = 0; s < n; s++) for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) {
      const r = fileToRas([x, y, first + s]);
      bmp[r[0] + r[1] * dx + r[2] * dx * dy] = bytes[s * W * H + x + y * W];
    }
  }
  nv.refreshDrawing(true);
}
async function fetchSlices(range, live = false) {
  if (!range) return;
  const [first, last] = range;
  const r = await api("GET", volPath(`/labels.raw?first=${first}&last=${last}${live ? "&live=true" : ""}`), undefined, true);
  drawSlices(first, new Uint8Array(await r.arrayBuffer()));
}

// ---- the organ table, Dice, stops -------------------------------------------------------------------------------
async function refreshStatus() {
  state.status = await api("GET", volPath());
  state.version = state.status.version;
  renderOrgans();
}
function renderOrgans() {
  const st = state.status, body = $("organs").tBodies[0];
  $("dice-head").hidden = !st.dice;
  body.textContent = "";
  state.organs.forEach((name, i) => {
    const o = st.organs[name], dice = st.dice ? st.dice[name] : undefined;
    if (!o && dice === undefined && name !== state.organ) return;
    const tr = body.insertRow();
    tr.className = name === state.organ ? "current" : "";
    tr.insertCell().innerHTML = `<span class="swatch" style="background: rgb(${COLORS[i].join(",")})"></span>`;
    const nameCell = tr.insertCell();
    nameCell.textContent = name.replaceAll("_", " ");
    nameCell.style.cursor = "pointer";
    nameCell.onclick = () => pickOrgan(name);
    tr.insertCell().textContent = o && o.slices ? `${o.slices[0]}–${o.slices[1]}` : "–";
    if (st.dice) tr.insertCell().textContent = dice === undefined ? "" : dice.toFixed(3);
    const walk = tr.insertCell();
    if (o && o.pending !== null && o.propagated) {
      const a = link(`corrected ${o.pending}`, o.pending, "P walks again from this slice up to the next anchors");
      a.className = "pending";
      walk.append(a);
    }
    for (const s of (o ? o.stops : [])) {
      walk.append(link(`${s.direction === "superior" ? "⤒" : "⤓"}${s.slice}`, s.slice,
        `the walk stopped ${s.direction} at slice ${s.slice}: ${s.reason}${s.at_volume_edge ? " (the volume's edge)" : ""}`));
    }
    for (const u of (o ? o.unsure : [])) walk.append(link(`?${u.slice}`, u.slice, `unsure: ${u.signals.join(", ")}`));
  });
  const list = $("anchors");
  list.textContent = "";
  for (const a of anchorsOf(state.organ)) {
    const li = document.createElement("li");
    li.append(link(`slice ${a.slice}`, a.slice, "go to this anchor"), ` ${a.given}`);
    list.append(li);
  }
  $("anchors-head").textContent = `anchors of ${state.organ.replaceAll("_", " ")}` +
    (list.children.length ? " (walks never change them)" : ": none yet");
}
function link(text, k, title) {
  const a = document.createElement("a");
  a.textContent = text;
  a.title = title;
  a.onclick = () => goToSlice(k);
  return a;
}
function pickOrgan(name) {
  state.organ = name;
  $("organ").value = name;
  state.prompt = null;
  if (state.status) renderOrgans();
  if (state.tool === "brush") nv.setPenValue(state.organs.indexOf(name) + 1, false);
  redrawUI();
}

// ---- prompts, propagation, corrections --------------------------------------------------------------------------
async function sendPrompt(body) {
  const k = body.slice;
  let timer = setTimeout(() => progress(null, `segmenting slice ${k} (encoding it first)…`), 250);
  clearError();
  try {
    const r = await api("POST", organPath("/prompt"), body);
    state.prompt = null;
    await fetchSlices(r.changed);
    const note = r.candidates.length > 1 ? ` · mask ${r.candidate + 1} of ${r.candidates.length} (C: next)` : "";
    const given = r.prompt ? ` · slice ${k} holds ${r.prompt.given}` : "";
    say(`${state.organ.replaceAll("_", " ")}, slice ${k}: ${r.area} pixels, predicted IoU ${r.iou.toFixed(2)}, ` +
        `${r.seconds.toFixed(2)} s${note}${given}${r.propagated ? " · P walks again from here" : ""}`);
    await refreshStatus();
    redrawUI();
    if (r.propagated && $("walk-on-click").checked && body.points) await propagate();
  } catch (err) { showError(err.message); }
  finally { clearTimeout(timer); progress(null, null); }
}
const anchorsOf = (organ) => (state.status && state.status.organs[organ] ? state.status.organs[organ].anchors : []);
const anchorAt = (organ, k) => anchorsOf(organ).find((a) => a.slice === k);
function onBox(a, b) {
  const box = [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
  state.prompt = { organ: state.organ, k: a[2], box };
  redrawUI();
  sendPrompt({ slice: a[2], box });
}
function onPoint(p, positive) {   // a click adds a point to what the slice holds (its box stays)
  const o = state.status && state.status.organs[state.organ];
  if (!positive && !(o && o.slices)) {
    say("Add a + point (a click) or a box on the organ first; − points (shift-click) only say where it is not.");
    return;
  }
  sendPrompt({ slice: p[2], points: [[p[0], p[1]]], labels: [positive ? 1 : 0] });
}
async function clearSlice() {
  const k = currentSlice();
  await step(`clearing slice ${k}…`, async () => {
    const r = await api("DELETE", organPath(`/slices/${k}`));
    await fetchSlices(r.changed);
    say(r.changed ? `slice ${k} of ${state.organ.replaceAll("_", " ")} starts afresh (Undo brings it back)`
                  : `${state.organ.replaceAll("_", " ")} has nothing on slice ${k}`);
    await refreshStatus();
    redrawUI();
  });
}

// ---- brush and eraser: NiiVue's own drawing, sent to the server slice by slice ----------------------------------------
function setTool(tool) {
  state.tool = tool;
  document.querySelectorAll("[data-tool]").forEach((b) => b.classList.toggle("on", b.dataset.tool === tool));
  const drawing = tool !== "prompt";
  nv.setMouseEventConfig(drawing ? MOUSE_DRAW : MOUSE_PROMPT);
  nv.setDrawingEnabled(drawing);
  nv.opts.penSize = Number($("pen-size").value) || 1;
  nv.setPenValue(tool === "brush" ? state.organs.indexOf(state.organ) + 1 : 0, false);
  say(drawing ? `${tool}: drag on the axial view to ${tool === "brush" ? "paint" : "erase"} ` +
      `${state.organ.replaceAll("_", " ")} on this slice (size ${nv.opts.penSize}); A: back to prompts` : "prompts: drag a box, click + / shift-click −");
}
function organMask(k) {   // the drawing layer's current organ on slice k, (H, W) row-major, as the server reads masks
  const vol = back(), [, W, H] = vol.hdr.dims, bmp = nv.drawBitmap, id = state.organs.indexOf(state.organ) + 1;
  const out = new Uint8Array(W * H);
  for (let y = 0; y < H; y++) for (let x = 0; x < W; x++) {
    const r = fileToRas([x, y, k]);
    out[x + y * W] = bmp[r[0] + r[1] * vol.dimsRAS[1] + r[2] * vol.dimsRAS[1] * vol.dimsRAS[2]] === id ? 1 : 0;
  }
  return out;
}
function runLengths(bits) {   // as sambtcv.servers.sessions.rle: runs of 0s and 1s, a run of 0s first
  const out = [];
  let value = 0, run = 0;
  for (const b of bits) { if (b === value) run++; else { out.push(run); value = b; run = 1; } }
  out.push(run);
  return out;
}
async function strokeDone() {
  const before = state.before, bmp = nv.drawBitmap;
  state.before = null;
  if (!before || !state.ready) return;
  const vol = back(), plane = vol.dimsRAS[1] * vol.dimsRAS[2], slices = new Set();
  for (let i = 0; i < bmp.length; i++) if (bmp[i] !== before[i]) slices.add(rasToFile([i % vol.dimsRAS[1], Math.floor(i / vol.dimsRAS[1]) % vol.dimsRAS[2], Math.floor(i / plane)])[2]);
  if (!slices.size) return;
  await step(`sending the ${state.tool}'s stroke…`, async () => {
    for (const k of slices) {
      const r = await api("POST", organPath("/paint"), { slice: k, mask: { counts: runLengths(organMask(k)) } });
      await fetchSlices(r.changed);
      say(`${state.organ.replaceAll("_", " ")}, slice ${k}: ${r.area} pixels painted by hand; the slice is an anchor`);
    }
    await refreshStatus();
  });
}
async function nextCandidate() {
  const o = state.status && state.status.organs[state.organ];
  if (!o || !o.candidates || o.candidates.length < 2) { say("Only a point prompt has other candidate masks."); return; }
  await step("showing the next mask…", async () => {
    const r = await api("POST", organPath("/candidate"), { index: (o.candidate + 1) % o.candidates.length });
    await fetchSlices(r.changed);
    say(`${state.organ.replaceAll("_", " ")}, slice ${r.slice}: mask ${r.candidate + 1} of ${r.candidates.length}, ` +
        `${r.area} pixels, predicted IoU ${r.iou.toFixed(2)}`);
    await refreshStatus();
  });
}
async function propagate() {
  if (state.walking) return;
  const organ = state.organ, label = organ.replaceAll("_", " ");
  clearError();
  state.walking = true;
  $("propagate").disabled = true;
  progress(0, `propagating ${label}…`);
  let drawn = 0, polling = true;
  const poll = (async () => {   // the walk's progress, slice by slice as it grows
    while (polling) {
      await new Promise((r) => setTimeout(r, 400));
      if (!polling) break;
      try {
        const st = await api("GET", volPath());
        const job = st.job;
        if (!job || !job.running || job.organ !== organ) continue;
        const fresh = job.kept.slice(drawn);
        if (fresh.length) { drawn = job.kept.length; await fetchSlices([Math.min(...fresh), Math.max(...fresh)], true); }
        const n = state.vol.shape[0];
        progress(job.visited / Math.max(1, n), `propagating ${label}: slice ${job.current ?? job.start}, ` +
                 `${job.visited} visited, ${job.kept.length + 1} kept, ${job.seconds.toFixed(0)} s`);
      } catch { /* the final answer says it */ }
    }
  })();
  try {
    const r = await api("POST", organPath("/propagate"), {});
    polling = false;
    await poll;
    await fetchSlices(r.changed);
    const stops = r.stops.map((s) => `${s.direction} at ${s.slice} (${s.reason})`).join(", ");
    say(`${label}: slices ${r.slices ? r.slices.join("–") : "none"}, ${r.voxels} voxels, ${r.visited} slices visited, ` +
        `${r.encoder_passes} encoder passes, ${r.seconds.toFixed(1)} s; stopped ${stops}`);
    await refreshStatus();
  } catch (err) { showError(err.message); }
  finally {
    polling = false;
    state.walking = false;
    $("propagate").disabled = false;
    progress(null, null);
  }
}
async function undo() {
  await step("undoing…", async () => {
    const r = await api("POST", volPath("/undo"));
    state.prompt = null;
    await fetchSlices(r.changed);
    say(`undid a change of ${r.organ.replaceAll("_", " ")} (${r.undo_steps} more steps can be undone)`);
    await refreshStatus();
    redrawUI();
  });
}
async function erase() {
  await step(`erasing ${state.organ}…`, async () => {
    const r = await api("DELETE", organPath(""));
    state.prompt = null;
    await fetchSlices(r.changed);
    say(`erased ${r.organ.replaceAll("_", " ")} (Undo brings it back)`);
    await refreshStatus();
    redrawUI();
  });
}
async function save() {
  await step("writing the label map…", async () => {
    let where = "";
    if (state.config.out && state.vol.id === state.config.volume) {
      where = ` and wrote ${(await api("POST", volPath("/save"))).written}`;
    }
    const r = await api("GET", volPath("/labels.nii.gz"), undefined, true);
    const url = URL.createObjectURL(await r.blob());
    const a = document.createElement("a");
    a.href = url;
    a.download = `${state.vol.name.replace(/\.nii(\.gz)?$/, "")}_labels.nii.gz`;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    say(`saved the label map (downloaded ${a.download}${where})`);
  });
}

async function saveSeg() {
  await step("writing the DICOM SEG…", async () => {
    const r = await api("GET", volPath("/seg.dcm"), undefined, true);
    const url = URL.createObjectURL(await r.blob());
    const a = document.createElement("a");
    a.href = url;
    a.download = `${state.vol.name.replace(/\.(nii(\.gz)?|zip)$/, "")}_seg.dcm`;
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
    say(`saved the DICOM SEG (downloaded ${a.download})${state.vol.seg_note ? "; " + state.vol.seg_note : ""}`);
  });
}

// ---- window / level -------------------------------------------------------------------------------------------------
function setPreset(name) {
  const [W, L] = PRESETS[name];
  back().cal_min = L - W / 2;
  back().cal_max = L + W / 2;
  nv.updateGLVolume();
  markPreset(name);
}
function markPreset(name) {
  state.preset = name;
  document.querySelectorAll("[data-preset]").forEach((b) => b.classList.toggle("on", b.dataset.preset === name));
  showReadout();
}

// ---- pointer: box, points, rubber band (#ui) ------------------------------------------------------------------------
const canvas = $("gl"), ui = $("ui"), uictx = ui.getContext("2d");
const rel = (e) => { const r = canvas.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; };
canvas.addEventListener("pointerdown", (e) => {
  if (state.tool !== "prompt") {
    state.press = null;
    if (e.button === 0 && state.ready) state.before = nv.drawBitmap.slice();
    return;
  }
  state.press = e.button === 0 && !e.ctrlKey ? { xy: rel(e), shift: e.shiftKey } : null;
  if (state.press) state.band = [...state.press.xy, ...state.press.xy];
}, { capture: true });
nv.onDrawingChanged = (action) => { if (action === "draw") strokeDone(); };
canvas.addEventListener("pointermove", (e) => { if (state.band) { state.band.splice(2, 2, ...rel(e)); redrawUI(); } });
window.addEventListener("pointerup", (e) => {   // capture: before NiiVue's own handler reports the drag
  if (state.press) state.press.end = rel(e);
  if (state.band) { state.band = null; redrawUI(); }
}, { capture: true });
nv.onDragRelease = (d) => {
  const press = state.press;
  state.press = null;
  if (!press || !state.ready || d.tileIdx < 0) return;
  const a = rasToFile(d.voxStart), b = rasToFile(d.voxEnd);
  if (d.axCorSag !== SLICE_TYPE.AXIAL) {   // the small views: go there
    const now = nv.frac2vox(nv.scene.crosshairPos);
    nv.moveCrosshairInVox(d.voxEnd[0] - now[0], d.voxEnd[1] - now[1], d.voxEnd[2] - now[2]);
    return;
  }
  const moved = press.end ? Math.hypot(press.end[0] - press.xy[0], press.end[1] - press.xy[1]) : 0;
  if (moved < CLICK_PX || (a[0] === b[0] && a[1] === b[1])) onPoint(b, !press.shift);
  else onBox(a, b);
};
function drawUI() {
  const d = window.devicePixelRatio || 1, w = canvas.clientWidth, h = canvas.clientHeight;
  if (ui.width !== Math.round(w * d) || ui.height !== Math.round(h * d)) { ui.width = Math.round(w * d); ui.height = Math.round(h * d); }
  uictx.setTransform(d, 0, 0, d, 0, 0);
  uictx.clearRect(0, 0, w, h);
  if (!state.ready) return;
  const k = currentSlice(), a = anchorAt(state.organ, k);
  const p = state.prompt && state.prompt.organ === state.organ && state.prompt.k === k ? state.prompt
    : (a && !a.painted ? { organ: state.organ, k, box: a.box, points: a.points, labels: a.labels } : null);
  if (p) {
    if (p.box) {
      const q0 = fileToScreen([p.box[0] - 0.5, p.box[1] - 0.5, p.k]), q1 = fileToScreen([p.box[2] + 0.5, p.box[3] + 0.5, p.k]);
      if (q0 && q1) {
        uictx.strokeStyle = "#0ff";
        uictx.lineWidth = 1.5;
        uictx.strokeRect(Math.min(q0[0], q1[0]), Math.min(q0[1], q1[1]), Math.abs(q1[0] - q0[0]), Math.abs(q1[1] - q0[1]));
      }
    }
    (p.points || []).forEach((xy, i) => {
      const c = fileToScreen([xy[0], xy[1], p.k]);
      if (!c) return;
      uictx.fillStyle = p.labels[i] ? "#0f0" : "#f33";
      uictx.beginPath(); uictx.arc(c[0], c[1], 4, 0, 2 * Math.PI); uictx.fill();
    });
  }
  if (state.band) {
    const [x0, y0, x1, y1] = state.band;
    uictx.strokeStyle = "#ff0";
    uictx.setLineDash([4, 3]);
    uictx.strokeRect(Math.min(x0, x1), Math.min(y0, y1), Math.abs(x1 - x0), Math.abs(y1 - y0));
    uictx.setLineDash([]);
  }
}
const redrawUI = () => requestAnimationFrame(drawUI);
window.addEventListener("resize", redrawUI);

// ---- readout, focus (the server encodes near the slice you look at) ----------------------------------------------
let focusTimer = null, lastFocus = -1;
function showReadout() {
  if (!state.ready) return;
  const v = back(), s = crosshairFile(), [, W, H] = v.hdr.dims;
  const value = v.img[s[0] + s[1] * W + s[2] * W * H] * (v.hdr.scl_slope || 1) + (v.hdr.scl_inter || 0);
  $("readout").textContent = `slice ${s[2]} of 0–${v.hdr.dims[3] - 1}   x ${s[0]}  y ${s[1]}   HU ${Math.round(value)}\n` +
    `W/L ${Math.round(v.cal_max - v.cal_min)}/${Math.round((v.cal_max + v.cal_min) / 2)}   ${state.vol.name}`;
}
nv.onLocationChange = () => {
  showReadout();
  redrawUI();
  const k = state.ready ? currentSlice() : -1;
  if (k >= 0 && k !== lastFocus) {
    clearTimeout(focusTimer);
    focusTimer = setTimeout(() => { lastFocus = k; api("PUT", volPath("/focus"), { slice: k }).catch(() => {}); }, 400);
  }
};

// ---- keys and buttons ---------------------------------------------------------------------------------------------------
document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT" || !state.ready) return;
  const presets = Object.keys(PRESETS), organKey = ORGAN_KEYS.indexOf(e.key);
  if ((e.ctrlKey || e.metaKey) && e.code === "KeyZ") undo();
  else if (e.ctrlKey || e.metaKey || e.altKey) return;
  else if (e.code === "KeyP") propagate();
  else if (e.code === "KeyC") nextCandidate();
  else if (e.code === "KeyB") setTool("brush");
  else if (e.code === "KeyE") setTool("eraser");
  else if (e.code === "KeyA") setTool("prompt");
  else if (e.code === "Delete" || e.code === "Backspace") clearSlice();
  else if (e.code === "KeyW") setPreset(presets[(presets.indexOf(state.preset) + 1) % presets.length]);
  else if (e.code === "Escape") { state.prompt = null; redrawUI(); }
  else if (e.code === "ArrowUp" || e.code === "PageUp") nv.moveCrosshairInVox(0, 0, 1);
  else if (e.code === "ArrowDown" || e.code === "PageDown") nv.moveCrosshairInVox(0, 0, -1);
  else if (organKey >= 0 && organKey < state.organs.length) pickOrgan(state.organs[organKey]);
  else return;
  e.preventDefault();
});
$("organ").onchange = (e) => pickOrgan(e.target.value);
$("propagate").onclick = () => propagate();
$("candidate").onclick = () => nextCandidate();
$("undo").onclick = () => undo();
$("erase").onclick = () => erase();
$("save").onclick = () => save();
$("clear").onclick = () => clearSlice();
document.querySelectorAll("[data-tool]").forEach((b) => (b.onclick = () => setTool(b.dataset.tool)));
$("pen-size").onchange = () => setTool(state.tool);
document.querySelectorAll("[data-preset]").forEach((b) => (b.onclick = () => setPreset(b.dataset.preset)));
$("file").onchange = async (e) => {
  const files = [...e.target.files];
  e.target.value = "";
  if (!files.length) return;
  const one = files.length === 1 && /\.(nii|nii\.gz|zip)$/i.test(files[0].name);
  let body = files[0], name = files[0].name;
  if (!one) {   // a DICOM series' files: zipped here (stored, not compressed), read as one series by the server
    const entries = {};
    for (const [i, f] of files.entries()) entries[`${i}_${f.name}`] = [new Uint8Array(await f.arrayBuffer()), { level: 0 }];
    body = new Blob([zipSync(entries)]);
    name = `${files.length} DICOM files`;
  }
  const info = await step(`uploading ${name} (${(body.size / 2 ** 20).toFixed(1)} MB) and reading it…`,
                          () => api("POST", "/api/volumes", body));
  if (info) await openVolume({ ...info, name: one ? name : info.name });
};
$("save-seg").onclick = () => saveSeg();

// ---- start ------------------------------------------------------------------------------------------------------------
async function openVolume(info) {
  state.ready = false;
  state.vol = info;
  $("save-seg").hidden = !info.dicom;
  state.prompt = null;
  await step(`loading the CT (${info.shape.join(" x ")} voxels)…`, async () => {
    const [W, L] = PRESETS[state.preset];
    await nv.loadVolumes([{ url: volPath("/image.nii.gz"), name: "image.nii.gz", cal_min: L - W / 2, cal_max: L + W / 2 }]);
    back().global_min = Math.min(back().global_min, -1024);   // free window/level beyond the central voxels' range
    back().global_max = Math.max(back().global_max, 3071);
    nv.createEmptyDrawing();
    nv.setDrawOpacity(0.5);
    nv.setCustomLayout(LAYOUT);
    state.ready = true;
    markPreset(state.preset);   // loaded with its window already: no second upload of the volume
    await fetchSlices([0, info.shape[0] - 1]);
    await refreshStatus();
    goToSlice(Math.floor(info.shape[0] / 2));
    say(`${info.name}: ${info.shape.join(" x ")} (slices x rows x columns), ${state.config.model} boxes, ` +
        `${state.config.point_model} clicks. Drag a box or click on the organ.`);
    canvas.focus();
  });
}
try {
  state.config = await api("GET", "/api/config");
  state.organs = state.config.organs;
  for (const [i, name] of state.organs.entries()) {
    const opt = new Option(`${ORGAN_KEYS[i]}  ${name.replaceAll("_", " ")}`, name);
    opt.style.color = `rgb(${COLORS[i].join(",")})`;
    $("organ").add(opt);
  }
  pickOrgan(state.organs[0]);
  await nv.attachTo("gl");
  nv.setDrawColormap({
    R: [0, ...COLORS.map((c) => c[0])], G: [0, ...COLORS.map((c) => c[1])], B: [0, ...COLORS.map((c) => c[2])],
    A: [0, ...COLORS.map(() => 255)], I: [...Array(14).keys()], labels: ["background", ...state.organs],
  });
  if (state.config.volume) {
    const st = await api("GET", `/api/volumes/${state.config.volume}`);
    await openVolume({ id: st.id, shape: st.shape, spacing: st.spacing, name: st.name, dicom: st.dicom,
                       seg_note: st.seg_note });
  } else {
    say("Open a CT (.nii or .nii.gz) with the button above.");
  }
} catch (err) {
  showError(err.message || String(err));
}

window.viewer = { nv, state, fileToScreen, currentSlice, goToSlice, propagate, save, setTool };   // tests, the console
