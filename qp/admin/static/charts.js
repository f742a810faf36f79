// Small SVG charts for the operator's page: stacked bars, drawn with DOM calls only (no
// markup from data), so whatever a label holds is shown as text.
"use strict";

window.QPCharts = (() => {
  const SVG = "http://www.w3.org/2000/svg";
  // Colours that read on a light and on a dark background alike.
  const PALETTE = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2",
    "#edc948", "#b07aa1", "#ff9da7", "#9c755f", "#bab0ac",
  ];

  function svg(tag, attributes, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      node.setAttribute(name, String(value));
    }
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // A round step for `ticks` grid lines up to `max`.
  function niceStep(max, ticks) {
    const raw = max / ticks;
    const power = 10 ** Math.floor(Math.log10(raw));
    const step = [1, 2, 2.5, 5, 10].find((m) => m * power >= raw) * power;
    return step;
  }

  // labels: the x values; series: [{name, values, color}]; format: a number as text;
  // label: a label as text for the axis (every few) and the tooltips.
  function stackedBars(container, {labels, series, format, axisLabel, emptyText}) {
    container.replaceChildren();
    // Drawn at the width it is shown at, so its type is the page's size on any screen.
    const width = Math.round(Math.max(300, Math.min(1200, container.clientWidth || 900)));
    const height = 260;
    const left = 64;
    const right = 8;
    const top = 10;
    const bottom = 34;
    const plotWidth = width - left - right;
    const plotHeight = height - top - bottom;
    const totals = labels.map((_, i) => series.reduce((sum, s) => sum + (s.values[i] || 0), 0));
    const max = Math.max(0, ...totals);
    const chart = svg("svg", {
      viewBox: `0 0 ${width} ${height}`,
      role: "img",
      class: "bars",
      "data-total": totals.reduce((a, b) => a + b, 0),
    });
    chart.appendChild(svg("title", {}, container.dataset.title || "chart"));
    if (max <= 0) {
      chart.appendChild(svg("text", {x: width / 2, y: height / 2, class: "empty",
        "text-anchor": "middle"}, emptyText || "Nothing yet"));
      container.appendChild(chart);
      return chart;
    }
    const step = niceStep(max, 4);
    const top_value = Math.ceil(max / step) * step;
    const y = (value) => top + plotHeight - (value / top_value) * plotHeight;
    for (let tick = 0; tick <= top_value + step / 2; tick += step) {
      chart.appendChild(svg("line", {x1: left, x2: width - right, y1: y(tick), y2: y(tick),
        class: "grid"}));
      chart.appendChild(svg("text", {x: left - 6, y: y(tick) + 4, class: "axis",
        "text-anchor": "end"}, format(tick)));
    }
    const slot = plotWidth / labels.length;
    const barWidth = Math.max(1, slot * 0.75);
    const every = Math.max(1, Math.ceil(labels.length / Math.max(2, Math.floor(plotWidth / 90))));
    labels.forEach((label, i) => {
      const x = left + i * slot + (slot - barWidth) / 2;
      let base = 0;
      const group = svg("g", {class: "bar"});
      const lines = [axisLabel(label)];
      series.forEach((s, k) => {
        const value = s.values[i] || 0;
        if (value > 0) {
          group.appendChild(svg("rect", {
            x, width: barWidth, y: y(base + value), height: Math.max(0.5, y(base) - y(base + value)),
            fill: s.color || PALETTE[k % PALETTE.length],
          }));
          lines.push(`${s.name}: ${format(value)}`);
        }
        base += value;
      });
      if (series.length > 1) lines.push(`total: ${format(totals[i])}`);
      group.appendChild(svg("title", {}, lines.join("\n")));
      chart.appendChild(group);
      if (i % every === 0) {
        chart.appendChild(svg("text", {x: left + i * slot + slot / 2, y: height - bottom + 18,
          class: "axis", "text-anchor": "middle"}, axisLabel(label)));
      }
    });
    container.appendChild(chart);
    return chart;
  }

  function colour(index) {
    return PALETTE[index % PALETTE.length];
  }

  return {stackedBars, colour};
})();
