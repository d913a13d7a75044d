// The story page: post the seed as JSON to /api/stories with the session cookie, append the streamed
// text as it arrives, then show what it cost. Loaded from a file: the Content-Security-Policy allows no
// inline script.
"use strict";

(function () {
  const form = document.getElementById("story-form");
  if (!form) return;
  const button = form.querySelector("button");
  const seed = form.querySelector("#seed");
  const story = document.getElementById("story");
  const text = story.querySelector('[data-testid="story-text"]');
  const status = document.getElementById("story-status");
  const cost = document.getElementById("story-cost");

  function say(message, link) {
    // Built with text nodes only: nothing the server or the seed says is parsed as HTML.
    status.replaceChildren(document.createTextNode(message));
    if (link) {
      const a = document.createElement("a");
      a.href = form.dataset.buy; // this site's own credits page, never a URL taken from a response
      a.textContent = link;
      status.append(" ", a);
    }
  }

  async function balance() {
    const answer = await fetch(form.dataset.balance, { headers: { Accept: "application/json" } });
    return answer.ok ? (await answer.json()).balance : null;
  }

  async function write() {
    const before = await balance();
    const answer = await fetch(form.dataset.api, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify({ seed: seed.value }),
    });
    if (!answer.ok) {
      const body = await answer.json().catch(() => ({}));
      if (answer.status === 402) {
        say(`Not enough credits: a story needs ${body.required} to start; you have ${body.balance}.`, "Buy credits");
      } else {
        say(body.message || `The story could not be written (${answer.status}).`);
      }
      return;
    }
    story.hidden = false;
    say("Writing...");
    const reader = answer.body.getReader();
    const decoder = new TextDecoder();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      text.textContent += decoder.decode(value, { stream: true });
    }
    text.textContent += decoder.decode();
    const after = await balance();
    if (before !== null && after !== null) {
      cost.textContent = `This story cost ${before - after} credits. You have ${after} left.`;
      cost.hidden = false;
      const badge = document.querySelector('[data-testid="credits-balance"]');
      if (badge) badge.textContent = after;
    }
    if (text.textContent.includes("[out of credits")) say("Out of credits: the story stopped.", "Buy credits");
    else say("Done.");
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    text.textContent = "";
    story.hidden = true;
    cost.hidden = true;
    button.disabled = true;
    const label = button.textContent;
    button.textContent = button.dataset.busy;
    try {
      await write();
    } catch (error) {
      say("The connection was lost; you were charged only for the part you received.");
    } finally {
      button.disabled = false;
      button.textContent = label;
    }
  });
})();
