"use strict";
// The patch-similarity explorer page (python -m evaluation.explore inlines this file). It decodes the features the
// command embeds in #explore-data (int8 codes times per-axis scales, L2-normalised) and, for the query patch, draws
// every shown model's cosine-similarity map on every image with the k nearest patches of each image marked.
// State lives in the address fragment: #image=I&patch=ROW,COL&view=sim|pca&models=0,1 (plus dump=1, which writes
// every similarity into #dump after each update, and bench=N, which times N updates at load into #bench).
(function () {
  const data = JSON.parse(document.getElementById("explore-data").textContent);
  const [GH, GW] = data.grid;
  const P = GH * GW; // patches per image
  const N = data.images.length;
  const K = data.top_k;
  const LUT = bytesOf(data.colormap.rgb); // 256 RGB triples
  const LABELS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ";

  function bytesOf(b64) {
    const text = atob(b64);
    const out = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
    return out;
  }

  // Decoded unit vectors, one row of `dims` per patch: the cosine's norms are divided out once, here.
  function unitVectors(model) {
    const codes = new Int8Array(bytesOf(model.codes).buffer);
    const d = model.dims;
    const out = new Float32Array(codes.length);
    for (let r = 0; r < codes.length; r += d) {
      let sumSq = 0;
      for (let j = 0; j < d; j++) {
        out[r + j] = codes[r + j] * model.scales[j];
        sumSq += out[r + j] * out[r + j];
      }
      const inv = sumSq > 0 ? 1 / Math.sqrt(sumSq) : 0;
      for (let j = 0; j < d; j++) out[r + j] *= inv;
    }
    return out;
  }

  const models = data.models.map((m, i) => ({
    ...m,
    label: LABELS[i % LABELS.length],
    unit: unitVectors(m),
    rgb: bytesOf(m.pca_rgb),
    sims: new Float32Array(N * P),
  }));
  const state = { image: 0, row: GH >> 1, col: GW >> 1, view: "sim", shown: models.map((_, i) => i), pinned: false };
  const options = { dump: false, bench: 0 };
  const $ = (id) => document.getElementById(id);

  // ---------------------------------------------------------------------------------------------------------------
  // The cells: one card per image, one cell per model in it (image, overlay canvas, marks).

  const cells = []; // cells[model][image]
  function buildCells() {
    const main = $("images");
    for (let m = 0; m < models.length; m++) cells.push([]);
    data.images.forEach((image, i) => {
      const card = document.createElement("section");
      card.className = "card";
      card.dataset.image = i;
      const title = document.createElement("h2");
      title.textContent = `${i}: ${image.name}`;
      title.title = image.name;
      card.appendChild(title);
      const row = document.createElement("div");
      row.className = "cells";
      models.forEach((model, m) => {
        const cell = document.createElement("figure");
        cell.className = "cell";
        cell.id = `cell-${m}-${i}`;
        cell.dataset.image = i;
        cell.dataset.model = m;
        cell.style.aspectRatio = `${image.width} / ${image.height}`;
        const img = document.createElement("img");
        img.src = image.src;
        img.alt = image.name;
        const canvas = document.createElement("canvas");
        canvas.width = GW;
        canvas.height = GH;
        const context = canvas.getContext("2d");
        const marks = document.createElement("div");
        marks.className = "marks";
        const markEls = [];
        for (let r = 0; r <= K; r++) {
          const mark = document.createElement("div");
          mark.className = r === 0 ? "mark query" : "mark nearest";
          mark.style.width = `${100 / GW}%`;
          mark.style.height = `${100 / GH}%`;
          if (r > 0) mark.dataset.rank = r;
          marks.appendChild(mark);
          markEls.push(mark);
        }
        const caption = document.createElement("figcaption");
        caption.textContent = model.label;
        caption.title = model.name;
        cell.append(img, canvas, marks, caption);
        row.appendChild(cell);
        const pca = context.createImageData(GW, GH);
        const base = i * P * 3;
        for (let p = 0; p < P; p++) {
          pca.data.set(model.rgb.subarray(base + 3 * p, base + 3 * p + 3), 4 * p);
          pca.data[4 * p + 3] = 255;
        }
        cells[m].push({ el: cell, context, heat: context.createImageData(GW, GH), pca, marks: markEls });
        cell.addEventListener("mousemove", (event) => hover(event, i, cell));
        cell.addEventListener("click", (event) => pick(event, i, cell));
      });
      card.appendChild(row);
      main.appendChild(card);
    });
  }

  // ---------------------------------------------------------------------------------------------------------------
  // One update: similarities, the colour scale, overlays, marks. Returns its duration in milliseconds.

  // sims[p] = unit[p] . unit[query]: the cosine similarity of every patch to the query.
  function computeSimilarities(model, query) {
    const d = model.dims;
    const unit = model.unit;
    const sims = model.sims;
    const q = unit.slice(query * d, query * d + d);
    for (let p = 0, r = 0; p < sims.length; p++, r += d) {
      let s = 0;
      for (let j = 0; j < d; j++) s += q[j] * unit[r + j];
      sims[p] = s;
    }
  }

  // The k most similar patches of image `image` (flat indices, most similar first); the query patch is skipped.
  // Ties keep the lower index first, as a stable sort would.
  function nearest(sims, image, exclude) {
    const idx = [];
    const val = [];
    const offset = image * P;
    for (let p = 0; p < P; p++) {
      if (p === exclude) continue;
      const v = sims[offset + p];
      if (idx.length === K && !(v > val[K - 1])) continue;
      let j = idx.length < K ? idx.length : K - 1;
      if (idx.length < K) {
        idx.push(p);
        val.push(v);
      }
      while (j > 0 && v > val[j - 1]) {
        idx[j] = idx[j - 1];
        val[j] = val[j - 1];
        j--;
      }
      idx[j] = p;
      val[j] = v;
    }
    return idx;
  }

  function place(mark, p, sim) {
    const row = Math.floor(p / GW);
    const col = p % GW;
    mark.hidden = false;
    mark.style.left = `${(100 * col) / GW}%`;
    mark.style.top = `${(100 * row) / GH}%`;
    mark.dataset.row = row;
    mark.dataset.col = col;
    mark.dataset.sim = sim;
  }

  let scale = { lo: 0, hi: 1 };
  let split = {}; // the last update's parts in milliseconds: similarities, drawing, layout
  function update() {
    const t0 = performance.now();
    const query = state.image * P + state.row * GW + state.col;
    const queryPatch = state.row * GW + state.col;
    let lo = Infinity;
    let hi = -Infinity;
    for (const m of state.shown) {
      computeSimilarities(models[m], query);
      const sims = models[m].sims;
      for (let p = 0; p < sims.length; p++) {
        if (sims[p] < lo) lo = sims[p];
        if (sims[p] > hi) hi = sims[p];
      }
    }
    const t1 = performance.now();
    if (!state.shown.length) [lo, hi] = [0, 1]; // no model shown: a scale for nothing
    if (!(hi - lo > 1e-6)) lo = hi - 1e-6; // one value everywhere: still a valid scale
    scale = { lo, hi };
    const inv = 255.999 / (hi - lo);
    models.forEach((model, m) => {
      const shown = state.shown.includes(m);
      for (let i = 0; i < N; i++) {
        const cell = cells[m][i];
        cell.el.hidden = !shown;
        if (!shown) continue;
        let image = cell.pca;
        if (state.view === "sim") {
          image = cell.heat;
          const px = image.data;
          const sims = model.sims;
          for (let p = 0, o = i * P; p < P; p++, o++) {
            const c = 3 * Math.min(255, Math.max(0, Math.floor((sims[o] - lo) * inv)));
            px[4 * p] = LUT[c];
            px[4 * p + 1] = LUT[c + 1];
            px[4 * p + 2] = LUT[c + 2];
            px[4 * p + 3] = 255;
          }
        }
        cell.context.putImageData(image, 0, 0);
        const isQueryImage = i === state.image;
        const marks = cell.marks;
        if (isQueryImage) place(marks[0], queryPatch, model.sims[query]);
        else marks[0].hidden = true;
        const top = nearest(model.sims, i, isQueryImage ? queryPatch : -1);
        cell.el.dataset.nearest = top.map((p) => `${Math.floor(p / GW)},${p % GW}`).join(" ");
        for (let r = 1; r <= K; r++) {
          if (r <= top.length) place(marks[r], top[r - 1], model.sims[i * P + top[r - 1]]);
          else marks[r].hidden = true;
        }
      }
    });
    drawLegend();
    const t2 = performance.now();
    document.body.offsetHeight; // lay the page out inside the timed part (the paint after it is not included)
    const t3 = performance.now();
    split = { similarities: t1 - t0, drawing: t2 - t1, layout: t3 - t2 };
    const ms = t3 - t0;
    showStatus(ms);
    writeFragment();
    if (options.dump) dump();
    return ms;
  }

  function drawLegend() {
    document.body.dataset.view = state.view;
    $("legend-lo").textContent = scale.lo.toFixed(3);
    $("legend-hi").textContent = scale.hi.toFixed(3);
    $("legend-lo").dataset.value = scale.lo;
    $("legend-hi").dataset.value = scale.hi;
    for (const button of document.querySelectorAll("button[data-view]")) {
      button.setAttribute("aria-pressed", String(button.dataset.view === state.view));
    }
    document.querySelectorAll(".card").forEach((card, i) => card.classList.toggle("query", i === state.image));
  }

  function showStatus(ms) {
    const status = $("status");
    status.dataset.updateMs = ms.toFixed(2);
    status.dataset.query = `${state.image},${state.row},${state.col}`;
    status.textContent =
      `query: image ${state.image} (${data.images[state.image].name}), patch row ${state.row}, column ${state.col}` +
      `${state.pinned ? ", pinned" : ""}; update ${ms.toFixed(1)} ms`;
  }

  function dump() {
    const out = { query: [state.image, state.row, state.col], lo: scale.lo, hi: scale.hi, models: {} };
    for (const m of state.shown) out.models[m] = Array.from(models[m].sims);
    $("dump").textContent = JSON.stringify(out);
  }

  // ---------------------------------------------------------------------------------------------------------------
  // The address fragment.

  function readFragment() {
    const params = new URLSearchParams(location.hash.slice(1));
    const image = Number.parseInt(params.get("image"), 10);
    if (image >= 0 && image < N) state.image = image;
    const patch = (params.get("patch") || "").split(",").map((v) => Number.parseInt(v, 10));
    if (patch.length === 2 && patch[0] >= 0 && patch[0] < GH && patch[1] >= 0 && patch[1] < GW) {
      [state.row, state.col] = patch;
      state.pinned = true; // a shared view stays put when the mouse moves
    }
    if (params.get("view") === "sim" || params.get("view") === "pca") state.view = params.get("view");
    if (params.has("models")) {
      state.shown = params
        .get("models")
        .split(",")
        .filter((v) => v !== "")
        .map(Number)
        .filter((m) => Number.isInteger(m) && m >= 0 && m < models.length);
    }
    options.dump = params.get("dump") === "1";
    options.bench = Math.max(0, Number.parseInt(params.get("bench") || "0", 10) || 0);
    for (const box of document.querySelectorAll("#model-toggles input")) {
      box.checked = state.shown.includes(Number(box.value));
    }
  }

  let written = "";
  function writeFragment() {
    const parts = [
      `image=${state.image}`,
      `patch=${state.row},${state.col}`,
      `view=${state.view}`,
      `models=${state.shown.join(",")}`,
    ];
    if (options.dump) parts.push("dump=1");
    written = `#${parts.join("&")}`;
    if (location.hash !== written) history.replaceState(null, "", written);
    $("status").dataset.fragment = location.hash;
  }

  // ---------------------------------------------------------------------------------------------------------------
  // Interaction.

  // One update for a burst of events (mouse moves, key repeats), run as soon as they have been handled.
  let pending = false;
  function scheduleUpdate() {
    if (pending) return;
    pending = true;
    setTimeout(() => {
      pending = false;
      update();
    }, 0);
  }

  function patchAt(event, cell) {
    const box = cell.getBoundingClientRect();
    const col = Math.min(GW - 1, Math.max(0, Math.floor(((event.clientX - box.left) / box.width) * GW)));
    const row = Math.min(GH - 1, Math.max(0, Math.floor(((event.clientY - box.top) / box.height) * GH)));
    return [row, col];
  }

  function hover(event, image, cell) {
    const [row, col] = patchAt(event, cell);
    if (state.pinned) {
      const p = image * P + row * GW + col;
      const values = state.shown.map((m) => `${models[m].label} ${models[m].sims[p].toFixed(3)}`).join(", ");
      $("status").textContent = `pinned query: image ${state.image}, patch ${state.row},${state.col}; under the pointer: image ${image}, patch ${row},${col}: ${values}`;
      return;
    }
    if (image === state.image && row === state.row && col === state.col) return;
    Object.assign(state, { image, row, col });
    scheduleUpdate();
  }

  function pick(event, image, cell) {
    const [row, col] = patchAt(event, cell);
    const same = state.pinned && image === state.image && row === state.row && col === state.col;
    Object.assign(state, { image, row, col, pinned: !same });
    scheduleUpdate();
  }

  const MOVES = { ArrowUp: [-1, 0], ArrowDown: [1, 0], ArrowLeft: [0, -1], ArrowRight: [0, 1] };
  document.addEventListener("keydown", (event) => {
    if (event.target instanceof HTMLInputElement && event.target.type === "range") return;
    if (event.key in MOVES) {
      const [dr, dc] = MOVES[event.key];
      state.row = Math.min(GH - 1, Math.max(0, state.row + dr));
      state.col = Math.min(GW - 1, Math.max(0, state.col + dc));
      state.pinned = true;
      event.preventDefault();
    } else if (event.key === "Escape") {
      state.pinned = false;
    } else if (event.key === "v") {
      state.view = state.view === "sim" ? "pca" : "sim";
    } else {
      return;
    }
    scheduleUpdate();
  });

  window.addEventListener("hashchange", () => {
    if (location.hash === written) return;
    readFragment();
    scheduleUpdate();
  });

  function buildControls() {
    for (const button of document.querySelectorAll("button[data-view]")) {
      button.addEventListener("click", () => {
        state.view = button.dataset.view;
        scheduleUpdate();
      });
    }
    const toggles = $("model-toggles");
    const notes = $("model-notes");
    models.forEach((model, m) => {
      const label = document.createElement("label");
      const box = document.createElement("input");
      box.type = "checkbox";
      box.value = m;
      box.checked = true;
      box.addEventListener("change", () => {
        state.shown = models.map((_, i) => i).filter((i) => toggles.querySelector(`input[value="${i}"]`).checked);
        scheduleUpdate();
      });
      label.append(box, ` ${model.label}`);
      label.title = model.name;
      toggles.appendChild(label);
      const note = document.createElement("li");
      const name = document.createElement("b");
      name.textContent = `${model.label}: ${model.name}`;
      note.append(
        name,
        `: ${model.embed_dim}-dim patch features at ${data.size} px (${GH}x${GW} patches), stored on ${model.dims} ` +
          `principal axes (${(100 * model.retained).toFixed(1)}% of the energy) as int8; their cosines differ from ` +
          `the full features' by ${model.similarity_error.mean.toFixed(3)} on average, ` +
          `${model.similarity_error.max.toFixed(3)} at most (${data.error_queries} sampled query patches).`,
      );
      notes.appendChild(note);
    });
    $("legend-k").textContent = K;
    const bar = $("legend-bar").getContext("2d");
    const ramp = bar.createImageData(256, 1);
    for (let c = 0; c < 256; c++) {
      ramp.data.set(LUT.subarray(3 * c, 3 * c + 3), 4 * c);
      ramp.data[4 * c + 3] = 255;
    }
    bar.putImageData(ramp, 0, 0);
    const root = document.documentElement.style;
    const opacity = $("opacity");
    const zoom = $("zoom");
    const restyle = () => {
      root.setProperty("--overlay", opacity.value);
      root.setProperty("--cell", `${zoom.value}px`);
    };
    opacity.addEventListener("input", restyle);
    zoom.addEventListener("input", restyle);
    restyle();
  }

  // Time `count` updates at query patches spread over all images (the JIT has warmed up on the first update).
  function bench(count) {
    const saved = { ...state };
    const times = [];
    const parts = { similarities: [], drawing: [], layout: [] };
    for (let n = 0; n < count; n++) {
      const q = (n * 7919 + 13) % (N * P);
      Object.assign(state, { image: Math.floor(q / P), row: Math.floor((q % P) / GW), col: q % GW });
      times.push(update());
      for (const key in parts) parts[key].push(split[key].toFixed(2));
    }
    Object.assign(state, saved);
    update();
    const sorted = [...times].sort((a, b) => a - b);
    const out = $("bench") || document.body.appendChild(Object.assign(document.createElement("pre"), { id: "bench" }));
    out.dataset.times = times.map((t) => t.toFixed(2)).join(",");
    for (const key in parts) out.dataset[key] = parts[key].join(",");
    out.dataset.medianMs = sorted[sorted.length >> 1].toFixed(2);
    out.textContent = `${count} updates: median ${out.dataset.medianMs} ms, max ${sorted[sorted.length - 1].toFixed(2)} ms`;
  }

  buildControls();
  buildCells();
  readFragment();
  const first = update();
  $("status").dataset.firstUpdateMs = first.toFixed(2);
  if (options.bench) bench(options.bench);
})();
