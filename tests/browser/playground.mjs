// The playground in headless Chromium (playwright-core): loads the page with an API key,
// streams a completion (≥ 10 coloured tokens with hover alternatives, TTFT and tokens/s shown),
// chats, runs a tiny fine-tune and sees the loss curve get points and the new model selected.
// Usage: node playground.mjs BASE_URL API_KEY SCREENSHOT_DIR
import { chromium } from "playwright-core";

const [base, key, shots] = process.argv.slice(2);
const executablePath = process.env.CHROMIUM;
const browser = await chromium.launch({ executablePath, args: ["--no-sandbox"] });
const page = await browser.newPage({ viewport: { width: 1280, height: 860 } });
const errors = [];
page.on("pageerror", (e) => errors.push(e.message));
const check = (ok, what) => { if (!ok) throw new Error("check failed: " + what); };

try {
  await page.goto(base + "/");
  await page.fill("#key", key);
  await page.dispatchEvent("#key", "change");
  await page.waitForFunction(() => document.querySelector("#model").options.length > 0);
  check(await page.evaluate(() => localStorage.getItem("nextoken-key")) === key, "key stored");

  // Completion: tokens stream in, coloured, with alternatives on hover.
  await page.fill("#temperature", "0");
  await page.fill("#max_tokens", "24");
  await page.click("#run-completion");
  await page.waitForFunction(() => document.querySelectorAll("#out .tok[data-tip]").length >= 10, null, { timeout: 60000 });
  await page.waitForFunction(() => /tokens\/s · 24 tokens/.test(document.querySelector("#stats").textContent), null, { timeout: 60000 });
  const stats = await page.textContent("#stats");
  check(/TTFT \d+ ms/.test(stats), "TTFT shown: " + stats);
  const bg = await page.$eval("#out .tok[data-tip]", (s) => s.style.background);
  check(bg.startsWith("hsla") || bg.startsWith("rgba"), "token coloured: " + bg);
  await page.hover("#out .tok[data-tip]");
  const tip = await page.textContent("#tip");
  check(tip.includes("p = ") && tip.split("\n").length >= 3, "alternatives on hover: " + tip);
  await page.screenshot({ path: `${shots}/completion.png` });

  // Chat.
  await page.click("nav button[data-tab=chat]");
  await page.fill("#chat-input", "What is 2+2?");
  await page.fill("#max_tokens", "16");
  await page.click("#run-chat");
  await page.waitForFunction(() => document.querySelectorAll("#history .msg").length >= 2, null, { timeout: 60000 });
  const reply = await page.textContent("#history .msg:nth-child(2)");
  check(reply.startsWith("assistant:") && reply.length > 12, "assistant replied: " + reply);
  await page.screenshot({ path: `${shots}/chat.png` });

  // Fine-tune: the loss curve gets points, then the new model is selected.
  await page.click("nav button[data-tab=finetune]");
  await page.fill("#ft-epochs", "2");
  await page.click("#run-finetune");
  await page.waitForFunction(
    () => document.querySelector("#loss-line").getAttribute("points").split(" ").filter(Boolean).length >= 2,
    null, { timeout: 180000 });
  await page.waitForFunction(() => document.querySelector("#model").value.startsWith("ft:"), null, { timeout: 180000 });
  const status = await page.textContent("#status");
  check(/running \d+ · waiting \d+ · KV/.test(status), "status strip: " + status);
  await page.screenshot({ path: `${shots}/finetune.png` });

  // Try the new model in the same page.
  await page.click("nav button[data-tab=completion]");
  await page.fill("#prompt", "The river Dunmere flows into");
  await page.fill("#max_tokens", "6");
  await page.click("#run-completion");
  // (It may stop on EOS before 6 tokens.) The prompt is the first span; tokens follow it.
  await page.waitForFunction(() => document.querySelectorAll("#out .tok[data-tip]").length >= 1, null, { timeout: 60000 });
  check((await page.textContent("#out")).startsWith("The river Dunmere flows into"), "fine-tuned model answered");
  check(errors.length === 0, "no page errors: " + errors.join("; "));
  console.log("playground: ok");
} finally {
  await browser.close();
}
