// Drives the real openai-node and replicate-js clients against a fluxserve URL; prints one JSON line.
import OpenAI, { toFile } from "openai";
import Replicate from "replicate";

const [base, key] = process.argv.slice(2);
const out = {};
const openai = new OpenAI({ apiKey: key, baseURL: `${base}/v1`, maxRetries: 0 });
const png = Buffer.from(
  "iVBORw0KGgoAAAANSUhEUgAAAEAAAABACAIAAAAlC+aJAAAAYklEQVR4nO3PMQ0AIADAMOBDJ/49IIKjIVkVbHOfPX62dMCrBrQGtAa0BrQGtAa0BrQGtAa0BrQGtAa0BrQGtAa0BrQGtAa0BrQGtAa0BrQGtAa0BrQGtAa0BrQGtAa0BrQLTpQA9ebdVUMAAAAASUVORK5CYII=",
  "base64",
);
const stream = await openai.images.edit({
  model: "flux-kontext-pro", image: await toFile(png, "in.png", { type: "image/png" }),
  prompt: "node edit", size: "256x256", stream: true, partial_images: 1, steps: 4,
});
out.edit_stream = [];
for await (const event of stream) out.edit_stream.push(event.type);

const replicate = new Replicate({ auth: key, baseUrl: `${base}/v1`, useFileOutput: false });
const uploaded = await replicate.files.create(png, { purpose: "js upload" });
out.file = [uploaded.metadata.purpose, uploaded.size, uploaded.urls.get.startsWith(`${base}/v1/files/`)];
const model = await replicate.models.get("black-forest-labs", "flux-schnell");
out.model = [model.owner, model.name, model.latest_version.id.length];
out.stream = [];
for await (const event of replicate.stream("black-forest-labs/flux-schnell", {
  input: { prompt: "js stream", megapixels: "0.25" },
})) out.stream.push(event.event);
const running = await replicate.predictions.create({
  model: "black-forest-labs/flux-dev", input: { prompt: "cancel me", num_inference_steps: 50 },
});
let current = running;
for (let i = 0; i < 200 && current.status !== "processing"; i++) {
  await new Promise((resolve) => setTimeout(resolve, 50));
  current = await replicate.predictions.get(running.id);
}
out.cancel = (await replicate.predictions.cancel(running.id)).status;
console.log(JSON.stringify(out));
