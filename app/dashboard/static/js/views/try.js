// Trying a fine-tuned model from its job's page: predictions for a classifier or a tabular
// model (POST /v1/predictions), a streamed chat for a generative one (/v1/chat/completions).

import { events, get, modelPath, post } from "../api.js";
import { errorBox, h, number, replace, table } from "../dom.js";

export async function tryModel(slot, modelId, signal) {
  const model = await get(`/models/${modelPath(modelId)}`, { signal });
  const body =
    model.task === "causal-lm"
      ? chatBox(model)
      : model.task === "classification" || model.task === "tabular"
        ? predictBox(model)
        : h("p", { class: "hint" }, `A model of kind ${model.task}: see the API for what it serves.`);
  replace(
    slot,
    h(
      "section",
      { class: "card", "aria-labelledby": "try-title", id: "try" },
      h("h2", { id: "try-title" }, "Try the model"),
      h("p", { class: "model" }, model.id, " ", h("span", { class: "badge" }, model.task ?? "model")),
      model.labels ? h("p", { class: "hint" }, `Labels: ${model.labels.join(", ")}`) : null,
      body,
    ),
  );
}

// "0.1, -2 3" or "[0.1, -2, 3]" -> [0.1, -2, 3]
function parseRow(line, number) {
  const values = line.replace(/[[\]]/g, " ").split(/[\s,;]+/).filter(Boolean).map(Number);
  if (!values.length || values.some((v) => !Number.isFinite(v))) {
    throw new Error(`Line ${number}: write numbers separated by commas or spaces.`);
  }
  return values;
}

function predictBox(model) {
  const tabular = model.task === "tabular";
  const input = h("textarea", {
    id: "try-input",
    rows: 3,
    required: true,
    placeholder: tabular ? "0.5, -1.2, 0.3, 0.0, 0.7, -0.4" : "what a lovely film",
    "aria-describedby": "try-input-hint",
  });
  const output = h("div", { id: "prediction", "aria-live": "polite" });
  const form = h(
    "form",
    { class: "try-form" },
    h("label", { for: "try-input" }, tabular ? "Rows of features" : "Texts to classify"),
    input,
    h("p", { class: "hint", id: "try-input-hint" }, tabular ? "One row per line, numbers separated by commas." : "One text per line."),
    h("button", { type: "submit" }, "Predict"),
    output,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const lines = input.value.split("\n").map((l) => l.trim()).filter(Boolean);
    let inputs;
    try {
      inputs = tabular ? lines.map((line, i) => parseRow(line, i + 1)) : lines;
    } catch (err) {
      replace(output, errorBox({ message: err.message }));
      return;
    }
    replace(output, h("p", { class: "hint" }, "Predicting…"));
    try {
      const answer = await post("/predictions", { model: model.id, input: inputs });
      const rows = answer.data.map((p) =>
        h(
          "tr",
          {},
          h("td", {}, tabular ? JSON.stringify(inputs[p.index]) : inputs[p.index]),
          h("td", { class: "label" }, p.label ?? p.text ?? ""),
          h("td", { class: "score" }, p.score === undefined ? "—" : number(p.score)),
          h("td", {}, Object.entries(p.scores ?? {}).map(([label, s]) => `${label} ${number(s)}`).join(", ")),
        ),
      );
      replace(output, table("Predictions", ["Input", "Label", "Score", "Scores"], rows));
    } catch (err) {
      replace(output, errorBox(err));
    }
  });
  return form;
}

function chatBox(model) {
  const messages = [];
  const conversation = h("ol", { class: "chat", "aria-label": "Conversation", id: "chat-log" });
  const input = h("textarea", { id: "chat-input", rows: 2, required: true, placeholder: "Say something" });
  const maxTokens = h("input", { id: "chat-max-tokens", type: "number", min: 1, max: 2048, value: "128" });
  const temperature = h("input", { id: "chat-temperature", type: "number", min: 0, max: 2, step: "0.1", value: "0.7" });
  const status = h("div", { "aria-live": "polite", id: "chat-status" });
  const form = h(
    "form",
    { class: "try-form" },
    conversation,
    h("label", { for: "chat-input" }, "Message"),
    input,
    h(
      "div",
      { class: "inline-fields" },
      h("label", { for: "chat-max-tokens" }, "Max tokens"),
      maxTokens,
      h("label", { for: "chat-temperature" }, "Temperature"),
      temperature,
    ),
    h(
      "div",
      { class: "actions" },
      h("button", { type: "submit" }, "Send"),
      h("button", { type: "button", class: "secondary", onclick: () => { messages.length = 0; conversation.replaceChildren(); } }, "Clear"),
    ),
    status,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    messages.push({ role: "user", content: text });
    conversation.append(h("li", { class: "user" }, h("span", { class: "who" }, "You"), text));
    const reply = h("span", { class: "text" });
    const item = h("li", { class: "assistant", "aria-live": "polite" }, h("span", { class: "who" }, "Model"), reply);
    conversation.append(item);
    input.value = "";
    replace(status);
    const send = form.querySelector("button[type=submit]");
    send.disabled = true;
    try {
      const request = {
        model: model.id,
        messages,
        stream: true,
        max_tokens: parseInt(maxTokens.value, 10) || 128,
        temperature: parseFloat(temperature.value) || 0,
      };
      for await (const chunk of events("/chat/completions", { method: "POST", json: request })) {
        const delta = chunk.choices?.[0]?.delta?.content;
        if (delta) reply.textContent += delta;
      }
      messages.push({ role: "assistant", content: reply.textContent });
    } catch (err) {
      messages.pop();
      item.remove();
      replace(status, errorBox(err));
    } finally {
      send.disabled = false;
    }
  });
  return form;
}
