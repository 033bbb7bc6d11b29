// Box drawing and region painting for `msdiff ui`. The page's fields are the single source of truth: the
// box text fields (#subjectN-box) and the hidden region fields (#subjectN-region: a PNG data URL of the
// subject's painted region, opaque where painted, "" for none). The canvas redraws from them several times a
// second (so typed numbers and imported jobs show at once) and writes to them, with an `input` event so that
// Gradio sees the change, while the mouse draws, moves or resizes a box, and when a brush or eraser stroke
// ends. Sizes come from #width / #height, phrases from #subjectN-phrase, the picture behind from #picture's link.
() => {
  const SUBJECTS = __SUBJECTS__;
  const PALETTE = __PALETTE__;
  const REGION_SIDE = __REGION_SIDE__; // px: a region is painted at the output's size, shrunk to fit this
  const HANDLE = 8; // px: how close to a corner a press resizes instead of moving
  let active = 0;
  let tool = "box"; // "box", "brush" or "eraser"
  let drag = null; // {mode: "new" | "move" | "resize" | "paint", subject, start, box, corner, last}
  let hover = null; // the pointer on the canvas (fractions), for the brush's outline
  // Per subject: the field's text shown, the mask it decodes to (a canvas; opaque = the region), its tint.
  const regions = [];
  const picture = { href: null, image: null };

  const field = (id) => document.querySelector(`#${id} input, #${id} textarea`);
  const colour = (i) => `rgb(${PALETTE[i % PALETTE.length].join(",")})`;
  const round = (v) => Math.round(Math.min(1, Math.max(0, v)) * 1000) / 1000;

  function readBox(i) {
    const input = field(`subject${i}-box`);
    if (!input) return null;
    const values = input.value.split(/[\s,]+/).filter((v) => v !== "").map(Number);
    if (values.length !== 4 || values.some((v) => !Number.isFinite(v))) return null;
    const [x0, y0, x1, y1] = values;
    return x1 > x0 && y1 > y0 ? values : null;
  }

  function writeBox(i, box) {
    const input = field(`subject${i}-box`);
    if (!input) return;
    input.value = box ? box.map(round).join(",") : "";
    input.dispatchEvent(new Event("input", { bubbles: true }));
  }

  function phrase(i) {
    const input = field(`subject${i}-phrase`);
    return (input && input.value.trim()) || `subject ${i + 1}`;
  }

  function outputSize() {
    return [Number((field("width") || {}).value) || 1, Number((field("height") || {}).value) || 1];
  }

  function aspect() {
    const [w, h] = outputSize();
    return h / w;
  }

  function maskSize() {
    const [w, h] = outputSize();
    const scale = Math.min(1, REGION_SIDE / Math.max(w, h));
    return [Math.max(1, Math.round(w * scale)), Math.max(1, Math.round(h * scale))];
  }

  function region(i) {
    if (!regions[i]) regions[i] = { value: "", mask: document.createElement("canvas"), tint: null, shown: false };
    return regions[i];
  }

  function syncRegion(i) {
    // The field changed from elsewhere (an import, a new page): show what it holds.
    const input = field(`subject${i}-region`);
    const value = input ? input.value : "";
    const r = region(i);
    if (value === r.value) return;
    r.value = value;
    [r.mask.width, r.mask.height] = maskSize(); // also clears it
    r.shown = false;
    r.tint = null;
    if (!value) return;
    const image = new Image();
    image.onload = () => {
      if (r.value !== value) return; // replaced meanwhile
      r.mask.getContext("2d").drawImage(image, 0, 0, r.mask.width, r.mask.height);
      r.shown = true;
      r.tint = null;
    };
    image.src = value;
  }

  function painted(mask) {
    // As the server reads it: a pixel is in the region when it is at least half opaque.
    const data = mask.getContext("2d").getImageData(0, 0, mask.width, mask.height).data;
    for (let k = 3; k < data.length; k += 4) if (data[k] >= 128) return true;
    return false;
  }

  function writeRegion(i) {
    const r = region(i);
    const value = painted(r.mask) ? r.mask.toDataURL("image/png") : "";
    r.value = value;
    r.shown = value !== "";
    r.tint = null;
    const input = field(`subject${i}-region`);
    if (!input) return;
    input.value = value;
    input.dispatchEvent(new Event("input", { bubbles: true }));
  }

  function brushSize() {
    return Number((document.querySelector("#brush-size") || {}).value) || 24;
  }

  function paint(canvas, i, from, to) {
    const r = region(i);
    const [w, h] = maskSize();
    if (r.mask.width !== w || r.mask.height !== h) {
      // The output's size changed since it was painted: keep the region, stretched as the server stretches it.
      const resized = document.createElement("canvas");
      [resized.width, resized.height] = [w, h];
      resized.getContext("2d").drawImage(r.mask, 0, 0, w, h);
      r.mask = resized;
    }
    const g = r.mask.getContext("2d");
    g.globalCompositeOperation = tool === "eraser" ? "destination-out" : "source-over";
    g.strokeStyle = g.fillStyle = "#fff";
    g.lineCap = g.lineJoin = "round";
    g.lineWidth = (brushSize() * w) / canvas.width; // the brush's size is on the screen
    g.beginPath();
    g.moveTo(from[0] * w, from[1] * h);
    g.lineTo(to[0] * w, to[1] * h);
    g.stroke();
    g.beginPath();
    g.arc(to[0] * w, to[1] * h, g.lineWidth / 2, 0, 2 * Math.PI);
    g.fill();
    r.shown = true;
    r.tint = null;
  }

  function tinted(i) {
    // The region in the subject's colour, made again only when the region changes.
    const r = region(i);
    if (!r.tint) {
      const t = document.createElement("canvas");
      [t.width, t.height] = [r.mask.width, r.mask.height];
      const g = t.getContext("2d");
      g.fillStyle = colour(i);
      g.fillRect(0, 0, t.width, t.height);
      g.globalCompositeOperation = "destination-in";
      g.drawImage(r.mask, 0, 0);
      r.tint = t;
    }
    return r.tint;
  }

  function syncPicture() {
    const link = document.querySelector("#picture a[download][href]"); // the File box's link to the upload
    const href = link ? link.href : null;
    if (href === picture.href) return;
    picture.href = href;
    picture.image = null;
    if (!href) return;
    const image = new Image();
    image.onload = () => { if (picture.href === href) picture.image = image; };
    image.src = href;
  }

  function point(canvas, event) {
    const rect = canvas.getBoundingClientRect();
    return [(event.clientX - rect.left) / rect.width, (event.clientY - rect.top) / rect.height];
  }

  function hit(canvas, p) {
    // The topmost box under the pointer (higher subjects are drawn last, so tested first).
    const rect = canvas.getBoundingClientRect();
    for (let i = SUBJECTS - 1; i >= 0; i--) {
      const box = readBox(i);
      if (!box) continue;
      const [x0, y0, x1, y1] = box;
      const corners = [[x0, y0], [x1, y0], [x0, y1], [x1, y1]];
      for (let c = 0; c < 4; c++) {
        const dx = (p[0] - corners[c][0]) * rect.width, dy = (p[1] - corners[c][1]) * rect.height;
        if (Math.abs(dx) <= HANDLE && Math.abs(dy) <= HANDLE) return { subject: i, mode: "resize", corner: c, box };
      }
      if (p[0] >= x0 && p[0] <= x1 && p[1] >= y0 && p[1] <= y1) return { subject: i, mode: "move", box };
    }
    return null;
  }

  function nextFree(from) {
    for (let k = 1; k <= SUBJECTS; k++) {
      const i = (from + k) % SUBJECTS;
      if (!readBox(i)) return i;
    }
    return from;
  }

  function draw(canvas) {
    const width = canvas.clientWidth;
    if (!width) return;
    const height = Math.round(width * aspect());
    if (canvas.height !== height || canvas.width !== width) {
      canvas.width = width;
      canvas.height = height;
      canvas.style.height = `${height}px`;
    }
    const g = canvas.getContext("2d");
    if (picture.image) {
      g.drawImage(picture.image, 0, 0, width, height); // the picture, stretched as the output is
    } else {
      g.fillStyle = "#f4f4f5";
      g.fillRect(0, 0, width, height);
      g.strokeStyle = "#d4d4d8";
      g.lineWidth = 1;
      for (let k = 1; k < 4; k++) {  // quarter lines help placing boxes
        g.beginPath(); g.moveTo((k * width) / 4, 0); g.lineTo((k * width) / 4, height); g.stroke();
        g.beginPath(); g.moveTo(0, (k * height) / 4); g.lineTo(width, (k * height) / 4); g.stroke();
      }
    }
    g.globalAlpha = 0.5;
    for (let i = 0; i < SUBJECTS; i++) if (region(i).shown) g.drawImage(tinted(i), 0, 0, width, height);
    g.globalAlpha = 1;
    g.font = "13px sans-serif";
    for (let i = 0; i < SUBJECTS; i++) {
      const box = readBox(i);
      if (!box) continue;
      const [x0, y0, x1, y1] = [box[0] * width, box[1] * height, box[2] * width, box[3] * height];
      g.fillStyle = colour(i).replace("rgb", "rgba").replace(")", ",0.15)");
      g.fillRect(x0, y0, x1 - x0, y1 - y0);
      g.strokeStyle = colour(i);
      g.lineWidth = i === active ? 3 : 2;
      g.strokeRect(x0, y0, x1 - x0, y1 - y0);
      const label = `${i + 1}: ${phrase(i)}`;
      g.fillStyle = colour(i);
      g.fillRect(x0, y0, g.measureText(label).width + 8, 18);
      g.fillStyle = "#fff";
      g.fillText(label, x0 + 4, y0 + 13);
      g.fillStyle = colour(i);
      for (const [cx, cy] of [[x0, y0], [x1, y0], [x0, y1], [x1, y1]]) g.fillRect(cx - 4, cy - 4, 8, 8);
    }
    if (tool !== "box" && hover) {  // where the brush or eraser would paint
      g.strokeStyle = tool === "eraser" ? "#52525b" : colour(active);
      g.lineWidth = 1.5;
      g.beginPath();
      g.arc(hover[0] * width, hover[1] * height, brushSize() / 2, 0, 2 * Math.PI);
      g.stroke();
    }
    document.querySelectorAll("#box-tools button[data-subject]").forEach((b) => {
      const i = Number(b.dataset.subject);
      b.classList.toggle("active", i === active);
      b.textContent = `${i + 1}: ${phrase(i)}`;
    });
    document.querySelectorAll("#box-tools button[data-tool]").forEach((b) =>
      b.classList.toggle("active", b.dataset.tool === tool));
  }

  function setup(canvas) {
    canvas.dataset.ready = "1";
    canvas.addEventListener("mousedown", (event) => {
      event.preventDefault();
      canvas.focus();
      const p = point(canvas, event);
      if (tool !== "box") {
        drag = { mode: "paint", subject: active, last: p };
        paint(canvas, active, p, p);
        return;
      }
      const found = hit(canvas, p);
      if (found) {
        active = found.subject;
        drag = { ...found, start: p };
      } else {
        drag = { mode: "new", subject: active, start: p };
      }
    });
    canvas.addEventListener("mousemove", (event) => { hover = point(canvas, event); });
    canvas.addEventListener("mouseleave", () => { hover = null; });
    window.addEventListener("mousemove", (event) => {
      if (!drag) return;
      const p = point(canvas, event);
      if (drag.mode === "paint") {
        paint(canvas, drag.subject, drag.last, p);
        drag.last = p;
        return;
      }
      const [sx, sy] = drag.start;
      let box;
      if (drag.mode === "new") {
        box = [Math.min(sx, p[0]), Math.min(sy, p[1]), Math.max(sx, p[0]), Math.max(sy, p[1])];
      } else if (drag.mode === "move") {
        const [x0, y0, x1, y1] = drag.box;
        const dx = Math.min(Math.max(p[0] - sx, -x0), 1 - x1), dy = Math.min(Math.max(p[1] - sy, -y0), 1 - y1);
        box = [x0 + dx, y0 + dy, x1 + dx, y1 + dy];
      } else {
        const [x0, y0, x1, y1] = drag.box;
        const fixed = [[x1, y1], [x0, y1], [x1, y0], [x0, y0]][drag.corner];  // the opposite corner
        box = [Math.min(fixed[0], p[0]), Math.min(fixed[1], p[1]), Math.max(fixed[0], p[0]), Math.max(fixed[1], p[1])];
      }
      box = box.map((v) => Math.min(1, Math.max(0, v)));
      if (box[2] - box[0] > 0.01 && box[3] - box[1] > 0.01) writeBox(drag.subject, box);
    });
    window.addEventListener("mouseup", () => {
      if (drag && drag.mode === "paint") writeRegion(drag.subject); // once per stroke: the field holds a PNG
      if (drag && drag.mode === "new" && readBox(drag.subject)) active = nextFree(drag.subject);
      drag = null;
    });
    canvas.addEventListener("keydown", (event) => {
      if (event.key === "Delete" || event.key === "Backspace") {
        writeBox(active, null);
        event.preventDefault();
      }
    });
    document.querySelectorAll("#box-tools button[data-subject]").forEach((b) =>
      b.addEventListener("click", () => { active = Number(b.dataset.subject); }));
    document.querySelectorAll("#box-tools button[data-tool]").forEach((b) =>
      b.addEventListener("click", () => { tool = b.dataset.tool; }));
    const remove = document.querySelector("#box-tools button[data-action=delete]");
    if (remove) remove.addEventListener("click", () => writeBox(active, null));
    const clear = document.querySelector("#box-tools button[data-action=clear-region]");
    if (clear) {
      clear.addEventListener("click", () => {
        const r = region(active);
        [r.mask.width, r.mask.height] = maskSize(); // cleared
        writeRegion(active);
      });
    }
  }

  setInterval(() => {
    const canvas = document.querySelector("#box-canvas");
    if (!canvas) return;
    if (!canvas.dataset.ready) setup(canvas);
    syncPicture();
    for (let i = 0; i < SUBJECTS; i++) syncRegion(i);
    draw(canvas);
  }, 100);
}
