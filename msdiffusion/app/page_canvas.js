// Box drawing for `msdiff ui`. The page's box text fields (#subjectN-box) are the single source of
// truth: the canvas redraws from them several times a second (so typed numbers and imported jobs
// show at once) and writes to them, with an `input` event so that Gradio sees the change, while the
// mouse draws, moves or resizes a box. Sizes come from #width / #height, phrases from #subjectN-phrase.
() => {
  const SUBJECTS = __SUBJECTS__;
  const PALETTE = __PALETTE__;
  const HANDLE = 8; // px: how close to a corner a press resizes instead of moving
  let active = 0;
  let drag = null; // {mode: "new" | "move" | "resize", subject, start, box, corner}

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

  function aspect() {
    const w = Number((field("width") || {}).value) || 1;
    const h = Number((field("height") || {}).value) || 1;
    return h / w;
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
    g.fillStyle = "#f4f4f5";
    g.fillRect(0, 0, width, height);
    g.strokeStyle = "#d4d4d8";
    g.lineWidth = 1;
    for (let k = 1; k < 4; k++) {  // quarter lines help placing boxes
      g.beginPath(); g.moveTo((k * width) / 4, 0); g.lineTo((k * width) / 4, height); g.stroke();
      g.beginPath(); g.moveTo(0, (k * height) / 4); g.lineTo(width, (k * height) / 4); g.stroke();
    }
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
    const buttons = document.querySelectorAll("#box-tools button[data-subject]");
    buttons.forEach((b) => {
      const i = Number(b.dataset.subject);
      b.classList.toggle("active", i === active);
      b.textContent = `${i + 1}: ${phrase(i)}`;
    });
  }

  function setup(canvas) {
    canvas.dataset.ready = "1";
    canvas.addEventListener("mousedown", (event) => {
      event.preventDefault();
      canvas.focus();
      const p = point(canvas, event);
      const found = hit(canvas, p);
      if (found) {
        active = found.subject;
        drag = { ...found, start: p };
      } else {
        drag = { mode: "new", subject: active, start: p };
      }
    });
    window.addEventListener("mousemove", (event) => {
      if (!drag) return;
      const p = point(canvas, event);
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
    const remove = document.querySelector("#box-tools button[data-action=delete]");
    if (remove) remove.addEventListener("click", () => writeBox(active, null));
  }

  setInterval(() => {
    const canvas = document.querySelector("#box-canvas");
    if (!canvas) return;
    if (!canvas.dataset.ready) setup(canvas);
    draw(canvas);
  }, 100);
}
