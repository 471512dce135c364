// The chat panel's message box (an anywidget), and the little the panel needs from the browser.
//
// - Enter sends (the Python side decides whether it can: a reply may be streaming);
//   Shift+Enter is a new line; the box stays editable while a reply streams.
// - No key typed anywhere in the panel reaches JupyterLab's or Notebook 7's shortcuts
//   (Shift+Enter would re-run the cell, "a"/"b"/"dd" add or delete cells): the panel's
//   root carries `data-lm-suppress-shortcuts`, which Lumino's keymap honours.
// - The conversation follows new text, unless the reader scrolled up to read.

const FOLLOW_SLACK_PX = 40; // "at the bottom" within this distance

function whenInPanel(el, then, tries = 600) {
  // the view is rendered before its parent attaches it: wait for the panel's root
  const root = el.closest(".offgrid-panel");
  if (root) then(root);
  else if (tries > 0) requestAnimationFrame(() => whenInPanel(el, then, tries - 1));
}

function followNewText(messages) {
  if (messages.dataset.offgridFollows) return; // one follower per rendered panel
  messages.dataset.offgridFollows = "1";
  let pinned = true; // the reader is at the bottom (or has not scrolled)
  messages.addEventListener("scroll", () => {
    pinned = messages.scrollHeight - messages.scrollTop - messages.clientHeight <= FOLLOW_SLACK_PX;
  });
  const follow = () => {
    if (pinned) messages.scrollTop = messages.scrollHeight;
  };
  new MutationObserver(follow).observe(messages, { childList: true, subtree: true, characterData: true });
  new ResizeObserver(follow).observe(messages);
  follow();
}

function render({ model, el }) {
  const box = document.createElement("textarea");
  box.className = "offgrid-message-box";
  box.rows = 3;
  box.placeholder = model.get("placeholder");
  box.setAttribute("aria-label", "Message to the model");
  box.style.cssText = "width: 100%; box-sizing: border-box; resize: vertical; font: inherit;";
  box.value = model.get("value");
  box.addEventListener("input", () => {
    model.set("value", box.value);
    model.save_changes();
  });
  box.addEventListener("keydown", (event) => {
    // Not even JupyterLab's application sees these keys: its keydown handler would also
    // cancel the line break of Shift+Enter inside a cell ("run cell" must not type a newline).
    event.stopPropagation();
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault(); // Enter sends; Shift+Enter is a new line
      model.set("value", box.value);
      model.set("submitted", model.get("submitted") + 1);
      model.save_changes();
    }
  });
  model.on("change:value", () => {
    if (box.value !== model.get("value")) box.value = model.get("value");
  });
  model.on("change:placeholder", () => { box.placeholder = model.get("placeholder"); });
  el.appendChild(box);
  whenInPanel(el, (root) => {
    root.setAttribute("data-lm-suppress-shortcuts", "true");
    const messages = root.querySelector(".offgrid-messages");
    if (messages) followNewText(messages);
  });
}

export default { render };
