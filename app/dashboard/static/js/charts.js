// Line charts of a job's metrics, drawn with the vendored uPlot (window.uPlot). Each chart
// plots some keys of the metrics events against their step. The uPlot instances are kept on
// window.tunehouse.charts, so what is drawn can be read back (the browser tests compare it with
// the job's events).

const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed"];

window.tunehouse = window.tunehouse ?? { charts: {} };

// The charts of a job page: the metrics keys each one plots, in the order given.
export const JOB_CHARTS = [
  { name: "loss", title: "Loss", series: [["train_loss", "train loss"], ["valid_loss", "validation loss"]] },
  {
    name: "accuracy",
    title: "Accuracy",
    series: [
      ["train_accuracy", "train accuracy"],
      ["valid_accuracy", "validation accuracy"],
      ["train_mean_token_accuracy", "train token accuracy"],
      ["valid_mean_token_accuracy", "validation token accuracy"],
    ],
  },
  { name: "learning_rate", title: "Learning rate", series: [["learning_rate", "learning rate"]] },
  {
    name: "throughput",
    title: "Throughput",
    series: [["samples_per_second", "samples/s"], ["tokens_per_second", "tokens/s", "right"]],
  },
];

// Axis labels with a few significant digits (uPlot's defaults round a learning rate to 0.001).
function tickLabel(value) {
  if (value === 0) return "0";
  const abs = Math.abs(value);
  if (abs < 1e-4 || abs >= 1e6) return value.toExponential(1);
  return String(Number(value.toPrecision(3)));
}
const ticks = (_plot, splits) => splits.map(tickLabel);

function cssVar(name, fallback) {
  return getComputedStyle(document.documentElement).getPropertyValue(name).trim() || fallback;
}

// One chart in `container`: its series are those of `spec` that have at least one value.
export class MetricsChart {
  constructor(container, spec) {
    this.container = container;
    this.spec = spec;
    this.plot = null;
    this.keys = [];
    this.resize = new ResizeObserver(() => this.plot?.setSize(this.size()));
    this.resize.observe(container);
  }

  size() {
    return { width: Math.max(200, this.container.clientWidth), height: 220 };
  }

  // `points`: the metrics by step, as [[step, data], ...] sorted by step.
  update(points) {
    if (this.destroyed) return false;
    const keys = this.spec.series.filter(([key]) => points.some(([, d]) => typeof d[key] === "number"));
    this.container.hidden = !keys.length; // shown before it is drawn, so it has its width
    if (!keys.length) return false;
    const data = [points.map(([step]) => step)];
    for (const [key] of keys) {
      data.push(points.map(([, d]) => (typeof d[key] === "number" ? d[key] : null)));
    }
    const shape = keys.map(([key]) => key).join();
    if (this.plot && shape === this.keys.join()) {
      this.plot.setData(data);
    } else {
      this.plot?.destroy();
      this.keys = keys.map(([key]) => key);
      this.plot = new window.uPlot(this.options(keys), data, this.container);
      window.tunehouse.charts[this.spec.name] = this.plot;
    }
    return true;
  }

  options(keys) {
    const axis = cssVar("--muted", "#555");
    const grid = cssVar("--grid", "#e5e7eb");
    const right = keys.some(([, , side]) => side === "right");
    const axes = [
      { label: "step", stroke: axis, grid: { stroke: grid }, ticks: { stroke: grid } },
      { stroke: axis, grid: { stroke: grid }, ticks: { stroke: grid }, size: 60, values: ticks },
    ];
    if (right) axes.push({ scale: "right", side: 1, stroke: axis, grid: { show: false }, size: 60, values: ticks });
    return {
      ...this.size(),
      title: this.spec.title,
      scales: { x: { time: false } },
      axes,
      cursor: { drag: { x: true, y: false } },
      legend: { live: false }, // names only; a value per point is in the event log
      series: [
        { label: "step" },
        ...keys.map(([key, label, side], i) => ({
          label,
          scale: side === "right" ? "right" : "y",
          stroke: COLORS[i % COLORS.length],
          width: 2,
          spanGaps: true, // validation metrics come at evaluation steps only
          points: { show: true, size: key.startsWith("valid") ? 6 : 3 },
        })),
      ],
    };
  }

  destroy() {
    this.destroyed = true;
    this.resize.disconnect();
    if (window.tunehouse.charts[this.spec.name] === this.plot) delete window.tunehouse.charts[this.spec.name];
    this.plot?.destroy();
    this.plot = null;
  }
}
