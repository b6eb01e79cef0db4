"use strict";
// The SAM 3 playground: one page, plain JavaScript, no build step and no library. It calls
// POST v1/segment as every client does, decodes the COCO RLE masks itself and draws them over the image.
// Like the Python clients, it sends an image's bytes once per model, then the answer's `image_id`, so that
// follow-up prompts on the image reuse its vision features on the service.
// `window.playground` exposes the pure functions and the state to the browser test.

(() => {
  const SEGMENT_URL = "v1/segment";
  const INFO_URL = "v1/info";
  // Other instances are drawn in this grey while one is highlighted.
  const DIM_RGB = [120, 120, 120];
  const POSITIVE_COLOUR = "#18a058";
  const NEGATIVE_COLOUR = "#d64545";
  const MIN_BOX_SIDE = 2;

  const ERROR_TITLES = {
    prompt_too_long: "The text prompt is too long for the model.",
    model_not_found: "The service does not serve that model.",
    invalid_prompt: "The service refused the prompt.",
    invalid_image: "The service could not read the image.",
    image_too_large: "The image is too large for this service.",
    request_too_large: "The image file is too large to send to this service.",
    unsupported_media_type: "The service refused the request's format.",
    invalid_request: "The service refused the request.",
    unauthorized: "This service needs a valid API key.",
    not_found: "The service has no such endpoint.",
    unavailable: "The service is busy or starting.",
    timeout: "The service did not answer in time.",
    internal_error: "The service failed on this request.",
    connection_failed: "The service could not be reached.",
  };
  const CODE_BY_STATUS = {
    400: "invalid_request", 401: "unauthorized", 404: "not_found", 413: "request_too_large",
    415: "unsupported_media_type", 422: "invalid_prompt", 500: "internal_error", 503: "unavailable", 504: "timeout",
  };

  // ---- Pure functions

  /** pycocotools' compressed counts string to run lengths (zeros first, column-major), as its rleFrString. */
  function rleCounts(counts) {
    const runs = [];
    let position = 0;
    while (position < counts.length) {
      let value = 0;
      let shift = 0;
      let more = true;
      while (more) {
        const chunk = counts.charCodeAt(position) - 48;
        value += (chunk & 0x1f) * 2 ** shift;
        shift += 5;
        more = (chunk & 0x20) !== 0;
        position += 1;
        if (!more && (chunk & 0x10) !== 0) value -= 2 ** shift;
      }
      if (runs.length > 2) value += runs[runs.length - 2];
      runs.push(value);
    }
    return runs;
  }

  /** The foreground pixels of a mask {size: [h, w], counts}, as row-major indices in ascending order. */
  function maskPixels(rle) {
    const [height, width] = rle.size;
    const runs = rleCounts(rle.counts);
    const pixels = new Uint32Array(runs.reduce((total, run, i) => total + (i % 2 === 1 ? run : 0), 0));
    let filled = 0;
    let position = 0;
    runs.forEach((run, i) => {
      if (i % 2 === 1) {
        for (let k = position; k < position + run; k += 1) {
          pixels[filled] = (k % height) * width + Math.floor(k / height);
          filled += 1;
        }
      }
      position += run;
    });
    return pixels.sort();
  }

  /** A mask as a row-major 0/1 array of height * width, the layout canvases use. */
  function decodeRle(rle) {
    const mask = new Uint8Array(rle.size[0] * rle.size[1]);
    for (const pixel of maskPixels(rle)) mask[pixel] = 1;
    return mask;
  }

  /** A distinct colour per instance rank: hues a golden angle apart, three lightness steps. */
  function colourOf(index) {
    const hue = (index * 137.508) % 360;
    const lightness = [0.5, 0.38, 0.64][index % 3];
    const saturation = 0.85;
    const chroma = saturation * Math.min(lightness, 1 - lightness);
    const channel = (n) => {
      const k = (n + hue / 30) % 12;
      return Math.round(255 * (lightness - chroma * Math.max(-1, Math.min(k - 3, 9 - k, 1))));
    };
    return [channel(0), channel(8), channel(4)];
  }

  /** A readable message for a failed answer: the service's typed error, or the proxy's plain 503. */
  function describeError(status, bodyText, retryAfter) {
    let code = CODE_BY_STATUS[status] || `http_${status}`;
    let message = "";
    try {
      const parsed = JSON.parse(bodyText);
      if (parsed && parsed.error) {
        code = parsed.error.code || code;
        message = parsed.error.message || "";
      }
    } catch {
      message = (bodyText || "").trim().slice(0, 300);
    }
    const sentences = [message && (/[.!?]$/.test(message) ? message : `${message}.`)];
    if (code === "unavailable" && retryAfter) sentences.push(`Try again in ${retryAfter} s.`);
    if (code === "unauthorized") sentences.push("Enter the service's API key above, then press Segment again.");
    return {
      code,
      status,
      title: ERROR_TITLES[code] || `The service answered with HTTP ${status}.`,
      detail: sentences.filter(Boolean).join(" "),
    };
  }

  /** The prompt's fields of a POST v1/segment body (all but the image). */
  function promptFields(prompt) {
    if (prompt.kind === "text") return { text: prompt.text };
    const items = prompt.kind === "boxes" ? prompt.boxes : prompt.points;
    return { [prompt.kind]: items.map((item) => item.coordinates), labels: items.map((item) => item.label) };
  }

  /** Why the prompt cannot be sent yet, or null. */
  function promptProblem(prompt) {
    if (prompt.kind === "text" && !prompt.text.trim()) return "Type a concept to segment, e.g. cat.";
    if (prompt.kind === "boxes" && prompt.boxes.length === 0) return "Drag at least one box on the image.";
    if (prompt.kind === "points" && prompt.points.length === 0) return "Click at least one point on the image.";
    if (prompt.kind !== "points" && prompt.maxInstances !== "" && !/^[1-9][0-9]*$/.test(prompt.maxInstances)) {
      return "At most: a whole number of instances, 1 or more (or empty for all).";
    }
    return null;
  }

  /** A POST v1/segment body: the image by the id an earlier answer gave for it on this model (the service
   * then reuses its vision features), else its bytes; `max_instances` for concept prompts only (a point
   * prompt answers one object). */
  function segmentBody(prompt, image, modelId, imageId) {
    const body = imageId ? { image_id: imageId } : { image: image.base64 };
    Object.assign(body, promptFields(prompt));
    if (modelId) body.model_id = modelId;
    if (prompt.kind !== "points" && prompt.maxInstances !== "") body.max_instances = Number(prompt.maxInstances);
    return body;
  }

  /** A model's line in the selector, and what its state means for the next request. */
  function modelLabel(model) {
    const size = model.image_size ? `, ${model.image_size} px` : "";
    return `${model.model_id}${model.default ? " (default)" : ""}: ${model.checkpoint}${size}`;
  }

  function modelNote(model) {
    if (model.loaded_replicas > 0) return `Loaded on ${model.loaded_replicas} replica(s).`;
    return "Not loaded now: the first request loads it, which can take a while.";
  }

  // ---- State and elements

  const $ = (id) => document.getElementById(id);
  const elements = {
    banner: $("random-weights-banner"), checkpoint: $("checkpoint"), keyRow: $("api-key-row"), apiKey: $("api-key"),
    modelRow: $("model-row"), model: $("model"), modelNote: $("model-note"),
    maxInstancesRow: $("max-instances-row"), maxInstances: $("max-instances"),
    error: $("error"), errorTitle: $("error-title"), errorDetail: $("error-detail"),
    fileInput: $("file-input"), stage: $("stage"), imageName: $("image-name"),
    imageLayer: $("image-layer"), maskLayer: $("mask-layer"), annotationLayer: $("annotation-layer"),
    textControls: $("text-controls"), textPrompt: $("text-prompt"), geometryControls: $("geometry-controls"),
    geometryHint: $("geometry-hint"), negative: $("negative"), negativeLabel: $("negative-label"),
    promptList: $("prompt-list"), clearPrompts: $("clear-prompts"), segment: $("segment"), timing: $("timing"),
    results: $("results"), scoreFilter: $("score-filter"), minScore: $("min-score"),
    minScoreValue: $("min-score-value"), summary: $("summary"),
    instances: $("instances"), downloadMask: $("download-mask"), downloadJson: $("download-json"),
  };
  const state = {
    info: null,
    image: null, // {name, base64, width, height, ids: Map(model id -> the image_id answers gave for it)}
    kind: "text",
    boxes: [], // {coordinates: [x0, y0, x1, y1], label}
    points: [], // {coordinates: [x, y], label}
    draft: null, // the box being dragged
    busy: false,
    result: null, // {response, prompt, instances: [{rank, score, box, label, rle, pixels}], union}
    minScore: 0,
    highlighted: null,
  };

  /** A copy: the answer keeps the prompt it was made for while the user edits the next one. */
  function currentPrompt() {
    return {
      kind: state.kind,
      text: elements.textPrompt.value,
      boxes: [...state.boxes],
      points: [...state.points],
      maxInstances: elements.maxInstances.value.trim(),
    };
  }

  /** The model chosen in the selector (null before the service's info is read). */
  function selectedModel() {
    return state.info ? state.info.models.find((model) => model.model_id === elements.model.value) || null : null;
  }

  function shownInstances() {
    return state.result ? state.result.instances.filter((instance) => instance.score >= state.minScore) : [];
  }

  // ---- Messages

  function showError(error) {
    elements.errorTitle.textContent = error.title;
    elements.errorDetail.textContent = error.detail || "";
    elements.error.dataset.code = error.code;
    elements.error.hidden = false;
  }

  function clearError() {
    elements.error.hidden = true;
    delete elements.error.dataset.code;
  }

  function revealKey() {
    elements.keyRow.hidden = false;
    elements.apiKey.focus();
  }

  async function loadInfo() {
    try {
      const response = await fetch(INFO_URL);
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      state.info = await response.json();
    } catch (error) {
      const detail = String(error.message || error);
      showError({ code: "connection_failed", title: "The service's info could not be read.", detail });
      return;
    }
    renderModels();
    if (state.info.api_key_required) elements.keyRow.hidden = false;
  }

  /** The selector lists every model the service serves, keeping the choice; the selector shows only when
   * there is a choice. The header and the banner follow the chosen model. */
  function renderModels() {
    const chosen = elements.model.value || state.info.models[0].model_id;
    elements.model.replaceChildren(...state.info.models.map((model) => {
      const option = document.createElement("option");
      option.value = model.model_id;
      option.textContent = modelLabel(model);
      option.dataset.loaded = String(model.loaded_replicas > 0);
      return option;
    }));
    elements.model.value = chosen;
    elements.modelRow.hidden = state.info.models.length < 2;
    showModel();
  }

  function showModel() {
    const model = selectedModel();
    elements.checkpoint.textContent = `checkpoint: ${model.checkpoint}`;
    elements.banner.hidden = !model.random_weights;
    elements.modelNote.textContent = modelNote(model);
  }

  /** Whether models are loaded changes as requests come: read again when the user is about to choose. */
  async function refreshModels() {
    try {
      const response = await fetch(INFO_URL);
      if (!response.ok) return;
      state.info = await response.json();
      renderModels();
    } catch {
      // the selector keeps what it showed; a request's own error says what is wrong
    }
  }

  // ---- Image

  function fileAsBase64(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result.slice(reader.result.indexOf(",") + 1));
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(file);
    });
  }

  async function openImage(file) {
    clearError();
    let bitmap;
    try {
      // EXIF orientation applied, as the service applies it: prompts and masks share its frame.
      bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
    } catch {
      showError({ code: "invalid_image", title: "This browser cannot show that file as an image.", detail: file.name });
      return;
    }
    state.image = {
      name: file.name, base64: await fileAsBase64(file), width: bitmap.width, height: bitmap.height, ids: new Map(),
    };
    for (const canvas of [elements.imageLayer, elements.annotationLayer]) {
      canvas.width = bitmap.width;
      canvas.height = bitmap.height;
    }
    elements.imageLayer.getContext("2d").drawImage(bitmap, 0, 0);
    bitmap.close();
    elements.stage.hidden = false;
    fitStage();
    elements.imageName.textContent = `${file.name}: ${state.image.width} x ${state.image.height} px`;
    state.boxes = [];
    state.points = [];
    setResult(null);
    renderPrompts();
    updateSegmentButton();
  }

  /** The image as large as the pane allows (small images too), at its own aspect ratio. */
  function fitStage() {
    if (!state.image) return;
    const paneWidth = elements.stage.parentElement.clientWidth;
    const top = elements.stage.getBoundingClientRect().top + window.scrollY;
    const maxHeight = Math.max(window.innerHeight - top - 24, 240);
    const scale = Math.min(paneWidth / state.image.width, maxHeight / state.image.height);
    elements.stage.style.width = `${Math.floor(state.image.width * scale)}px`;
    elements.stage.style.height = `${Math.floor(state.image.height * scale)}px`;
    drawAnnotations();
  }

  // ---- Prompts

  /** The image pixel under a mouse event (the canvas is scaled to fit the page). */
  function imagePoint(event) {
    const rect = elements.annotationLayer.getBoundingClientRect();
    const x = ((event.clientX - rect.left) * state.image.width) / rect.width;
    const y = ((event.clientY - rect.top) * state.image.height) / rect.height;
    const clamp = (value, limit) => Math.round(Math.min(Math.max(value, 0), limit));
    return [clamp(x, state.image.width), clamp(y, state.image.height)];
  }

  function setKind(kind) {
    state.kind = kind;
    elements.stage.dataset.kind = kind;
    elements.textControls.hidden = kind !== "text";
    elements.geometryControls.hidden = kind === "text";
    elements.maxInstancesRow.hidden = kind === "points";
    elements.geometryHint.textContent = kind === "boxes"
      ? "Drag boxes on the image: exemplars of the concept to find. Tick negative for an exemplar of what not to find."
      : "Click points on the object; right-click (or tick negative) for a point that is not on it.";
    elements.negativeLabel.textContent = kind === "boxes" ? "negative exemplar" : "negative point";
    renderPrompts();
  }

  function renderPrompts() {
    const items = state.kind === "boxes" ? state.boxes : state.kind === "points" ? state.points : [];
    elements.promptList.replaceChildren(...items.map((item, index) => {
      const row = document.createElement("li");
      row.classList.toggle("negative", item.label === 0);
      const text = document.createElement("span");
      const what = state.kind === "boxes" ? "box" : "point";
      text.textContent = `${item.label ? "+" : "-"} ${what} [${item.coordinates.join(", ")}]`;
      const remove = document.createElement("button");
      remove.type = "button";
      remove.textContent = "x";
      remove.title = "remove";
      remove.addEventListener("click", () => {
        items.splice(index, 1);
        renderPrompts();
      });
      row.append(text, remove);
      return row;
    }));
    drawAnnotations();
  }

  function addPrompt(list, coordinates, negative) {
    list.push({ coordinates, label: negative ? 0 : 1 });
    renderPrompts();
  }

  function updateSegmentButton() {
    elements.segment.disabled = state.busy || !state.image;
  }

  // ---- Drawing

  function drawAnnotations() {
    const canvas = elements.annotationLayer;
    const context = canvas.getContext("2d");
    context.clearRect(0, 0, canvas.width, canvas.height);
    if (!state.image) return;
    const scale = state.image.width / Math.max(canvas.getBoundingClientRect().width, 1);
    for (const instance of shownInstances()) {
      const [x0, y0, x1, y1] = instance.box;
      const highlighted = instance.rank === state.highlighted;
      context.lineWidth = (highlighted ? 3 : 1.5) * scale;
      context.strokeStyle = `rgb(${colourOf(instance.rank).join(",")})`;
      context.strokeRect(x0, y0, x1 - x0, y1 - y0);
    }
    if (state.kind === "boxes") {
      const boxes = state.draft ? [...state.boxes, state.draft] : state.boxes;
      context.setLineDash([6 * scale, 4 * scale]);
      context.lineWidth = 2 * scale;
      for (const box of boxes) {
        const [x0, y0, x1, y1] = box.coordinates;
        context.strokeStyle = box.label ? POSITIVE_COLOUR : NEGATIVE_COLOUR;
        context.strokeRect(x0, y0, x1 - x0, y1 - y0);
      }
      context.setLineDash([]);
    }
    if (state.kind === "points") {
      for (const point of state.points) {
        const [x, y] = point.coordinates;
        context.beginPath();
        context.arc(x, y, 6 * scale, 0, 2 * Math.PI);
        context.fillStyle = point.label ? POSITIVE_COLOUR : NEGATIVE_COLOUR;
        context.fill();
        context.lineWidth = 2 * scale;
        context.strokeStyle = "#fff";
        context.stroke();
      }
    }
  }

  /** Masks pixel for pixel and opaque (the layer is translucent in CSS), the best-scoring instance on top. */
  function drawMasks() {
    const canvas = elements.maskLayer;
    const context = canvas.getContext("2d");
    if (!state.result) {
      context.clearRect(0, 0, canvas.width, canvas.height);
      return;
    }
    const { width, height } = state.result.response;
    canvas.width = width;
    canvas.height = height;
    const image = context.createImageData(width, height);
    const paint = (pixels, rgb) => {
      for (const pixel of pixels) {
        const offset = pixel * 4;
        image.data[offset] = rgb[0];
        image.data[offset + 1] = rgb[1];
        image.data[offset + 2] = rgb[2];
        image.data[offset + 3] = 255;
      }
    };
    if (state.result.union) paint(state.result.union, colourOf(0));
    const shown = shownInstances();
    const highlighted = shown.find((instance) => instance.rank === state.highlighted);
    for (const instance of [...shown].reverse()) {
      paint(instance.pixels, highlighted ? DIM_RGB : colourOf(instance.rank));
    }
    if (highlighted) paint(highlighted.pixels, colourOf(highlighted.rank));
    context.putImageData(image, 0, 0);
  }

  function highlight(rank) {
    if (state.highlighted === rank) return;
    state.highlighted = rank;
    for (const row of elements.instances.children) {
      row.classList.toggle("highlighted", Number(row.dataset.rank) === rank);
    }
    drawMasks();
    drawAnnotations();
  }

  /** The best-scoring shown instance covering an image pixel, or null. */
  function instanceAt([x, y]) {
    if (!state.result) return null;
    const pixel = y * state.result.response.width + x;
    const found = shownInstances().find((instance) => {
      const pixels = instance.pixels;
      let low = 0;
      let high = pixels.length;
      while (low < high) {
        const middle = (low + high) >> 1;
        if (pixels[middle] < pixel) low = middle + 1;
        else high = middle;
      }
      return pixels[low] === pixel;
    });
    return found ? found.rank : null;
  }

  // ---- Results

  function setResult(result) {
    state.result = result;
    state.highlighted = null;
    elements.results.hidden = !result;
    if (!result) elements.timing.textContent = "";
    renderInstances();
    drawMasks();
    drawAnnotations();
  }

  function renderInstances() {
    const shown = shownInstances();
    elements.minScoreValue.textContent = state.minScore.toFixed(2);
    if (!state.result) {
      elements.instances.replaceChildren();
      return;
    }
    const total = state.result.instances.length;
    elements.scoreFilter.hidden = Boolean(state.result.union);
    elements.instances.hidden = Boolean(state.result.union);
    elements.summary.textContent = state.result.union
      ? "A point prompt answers one object: its mask is drawn, with no score."
      : `${shown.length} of ${total} instance(s) shown, sorted by score.`;
    elements.instances.replaceChildren(...shown.map((instance) => {
      const row = document.createElement("li");
      row.dataset.rank = instance.rank;
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = `rgb(${colourOf(instance.rank).join(",")})`;
      const rank = document.createElement("span");
      rank.textContent = `#${instance.rank + 1}`;
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = instance.score.toFixed(3);
      const box = document.createElement("span");
      box.className = "box";
      box.textContent = `[${instance.box.map((value) => Math.round(value)).join(", ")}]`;
      row.append(swatch, rank, score, box);
      row.addEventListener("mouseenter", () => highlight(instance.rank));
      row.addEventListener("mouseleave", () => highlight(null));
      return row;
    }));
  }

  function resultOf(response, prompt, model) {
    const order = response.scores.map((_, i) => i).sort((a, b) => response.scores[b] - response.scores[a]);
    return {
      response,
      prompt,
      modelId: model ? model.model_id : null,
      checkpoint: model ? model.checkpoint : null,
      instances: order.map((i, rank) => ({
        rank,
        score: response.scores[i],
        box: response.boxes[i],
        label: response.labels[i],
        rle: response.masks[i],
        pixels: maskPixels(response.masks[i]),
      })),
      union: response.masks.length === 0 ? maskPixels(response.union_mask) : null,
    };
  }

  function showTiming(response, elapsedMs) {
    const timings = response.timings_ms || {};
    const stages = Object.entries(timings)
      .filter(([stage]) => stage !== "total")
      .map(([stage, ms]) => `${stage} ${Math.round(ms)}`)
      .join(", ");
    const server = timings.total !== undefined ? ` (server ${Math.round(timings.total)} ms: ${stages})` : "";
    const cached = timings.vision === 0 ? " The image's vision features came from the service's cache." : "";
    elements.timing.textContent = `Request took ${Math.round(elapsedMs)} ms${server}.${cached}`;
  }

  // ---- Segment

  function showAnswer(response, text, prompt, model, elapsedMs) {
    if (!response.ok) {
      const error = describeError(response.status, text, response.headers.get("Retry-After"));
      setResult(null);
      showError(error);
      if (error.code === "unauthorized") revealKey();
      return;
    }
    const answer = JSON.parse(text);
    setResult(resultOf(answer, prompt, model));
    showTiming(answer, elapsedMs);
  }

  async function segment() {
    const prompt = currentPrompt();
    const problem = promptProblem(prompt);
    if (problem) {
      showError({ code: "incomplete_prompt", title: "Nothing to segment yet.", detail: problem });
      return;
    }
    clearError();
    state.busy = true;
    updateSegmentButton();
    const headers = { "Content-Type": "application/json" };
    const key = elements.apiKey.value.trim();
    if (key) headers.Authorization = `Bearer ${key}`;
    const image = state.image;
    const model = selectedModel();
    const modelId = model ? model.model_id : null;
    const started = performance.now();
    const send = async (imageId) => {
      const body = JSON.stringify(segmentBody(prompt, image, modelId, imageId));
      const response = await fetch(SEGMENT_URL, { method: "POST", headers, body });
      return { response, text: await response.text() };
    };
    try {
      const imageId = image.ids.get(modelId);
      let { response, text } = await send(imageId);
      if (imageId && describeError(response.status, text).code === "image_not_cached") {
        image.ids.delete(modelId); // the service let the image's features go: send the image again
        ({ response, text } = await send(null));
      }
      if (response.ok) {
        const imageId = JSON.parse(text).image_id;
        if (imageId) image.ids.set(modelId, imageId);
      }
      // An answer about an image the user has since replaced is dropped.
      if (state.image === image) showAnswer(response, text, prompt, model, performance.now() - started);
    } catch (error) {
      setResult(null);
      const detail = String(error.message || error);
      showError({ code: "connection_failed", title: ERROR_TITLES.connection_failed, detail });
    } finally {
      state.busy = false;
      updateSegmentButton();
      document.body.dataset.answered = Number(document.body.dataset.answered) + 1;
    }
  }

  // ---- Downloads (what is shown: instances under the score slider are left out)

  function save(blob, name) {
    const url = URL.createObjectURL(blob);
    const link = document.createElement("a");
    link.href = url;
    link.download = name;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000);
  }

  function baseName() {
    return state.image.name.replace(/\.[^.]*$/, "") || "image";
  }

  function downloadMask() {
    const { width, height } = state.result.response;
    const canvas = document.createElement("canvas");
    canvas.width = width;
    canvas.height = height;
    const context = canvas.getContext("2d");
    const image = context.createImageData(width, height);
    for (let offset = 3; offset < image.data.length; offset += 4) image.data[offset] = 255;
    const masks = state.result.union ? [state.result.union] : shownInstances().map((instance) => instance.pixels);
    for (const pixels of masks) {
      for (const pixel of pixels) image.data.fill(255, pixel * 4, pixel * 4 + 3);
    }
    context.putImageData(image, 0, 0);
    canvas.toBlob((blob) => save(blob, `${baseName()}-mask.png`), "image/png");
  }

  function downloadJson() {
    const { response, prompt } = state.result;
    const detections = {
      image: state.image.name,
      width: response.width,
      height: response.height,
      prompt: promptFields(prompt),
      model_id: state.result.modelId,
      checkpoint: state.result.checkpoint,
      min_score: state.minScore,
      instances: shownInstances().map((instance) => ({
        score: instance.score, box: instance.box, label: instance.label, mask: instance.rle,
      })),
      ...(state.result.union ? { union_mask: response.union_mask } : {}),
      timings_ms: response.timings_ms,
    };
    const blob = new Blob([JSON.stringify(detections, null, 2)], { type: "application/json" });
    save(blob, `${baseName()}-detections.json`);
  }

  // ---- Events

  function wire() {
    elements.fileInput.addEventListener("change", () => {
      if (elements.fileInput.files.length) openImage(elements.fileInput.files[0]);
      elements.fileInput.value = "";
    });
    const main = document.querySelector("main");
    main.addEventListener("dragover", (event) => {
      event.preventDefault();
      main.classList.add("dragging");
    });
    main.addEventListener("dragleave", () => main.classList.remove("dragging"));
    main.addEventListener("drop", (event) => {
      event.preventDefault();
      main.classList.remove("dragging");
      if (event.dataTransfer.files.length) openImage(event.dataTransfer.files[0]);
    });
    for (const radio of document.querySelectorAll('input[name="prompt-kind"]')) {
      radio.addEventListener("change", () => setKind(radio.value));
    }
    elements.textPrompt.addEventListener("keydown", (event) => {
      if (event.key === "Enter" && !elements.segment.disabled) segment();
    });
    elements.clearPrompts.addEventListener("click", () => {
      if (state.kind === "boxes") state.boxes = [];
      if (state.kind === "points") state.points = [];
      renderPrompts();
    });
    elements.segment.addEventListener("click", segment);
    elements.model.addEventListener("change", showModel);
    elements.model.addEventListener("focus", refreshModels);
    elements.minScore.addEventListener("input", () => {
      state.minScore = Number(elements.minScore.value);
      state.highlighted = null;
      renderInstances();
      drawMasks();
      drawAnnotations();
    });
    elements.downloadMask.addEventListener("click", downloadMask);
    elements.downloadJson.addEventListener("click", downloadJson);

    const layer = elements.annotationLayer;
    layer.addEventListener("pointerdown", (event) => {
      if (event.button !== 0 || state.kind !== "boxes") return;
      const start = imagePoint(event);
      state.draft = { start, coordinates: [...start, ...start], label: elements.negative.checked ? 0 : 1 };
      layer.setPointerCapture(event.pointerId);
    });
    layer.addEventListener("pointermove", (event) => {
      if (!state.image) return;
      const point = imagePoint(event);
      if (state.draft) {
        const [x0, y0] = state.draft.start;
        const [x1, y1] = point;
        state.draft.coordinates = [Math.min(x0, x1), Math.min(y0, y1), Math.max(x0, x1), Math.max(y0, y1)];
        drawAnnotations();
      } else {
        const inside = [Math.min(point[0], state.image.width - 1), Math.min(point[1], state.image.height - 1)];
        highlight(instanceAt(inside));
      }
    });
    layer.addEventListener("pointerup", () => {
      if (!state.draft) return;
      const [x0, y0, x1, y1] = state.draft.coordinates;
      const negative = state.draft.label === 0;
      state.draft = null;
      if (x1 - x0 >= MIN_BOX_SIDE && y1 - y0 >= MIN_BOX_SIDE) addPrompt(state.boxes, [x0, y0, x1, y1], negative);
      else drawAnnotations();
    });
    layer.addEventListener("pointerleave", () => {
      if (!state.draft) highlight(null);
    });
    layer.addEventListener("click", (event) => {
      if (state.kind === "points") addPrompt(state.points, imagePoint(event), elements.negative.checked);
    });
    layer.addEventListener("contextmenu", (event) => {
      if (state.kind !== "points") return;
      event.preventDefault();
      addPrompt(state.points, imagePoint(event), true);
    });
    window.addEventListener("resize", fitStage);
  }

  window.playground = {
    rleCounts, maskPixels, decodeRle, colourOf, describeError, promptFields, segmentBody, modelLabel, state,
  };
  wire();
  setKind("text");
  loadInfo();
})();
