// Reads a turn's log with the Durable Streams client (pinned in package.json), as the end-to-end
// tests call it: node read.mjs URL long-poll|sse [OFFSET] [STOP_AFTER_CHARS]
// Prints {"text", "offset", "closed"}: the text read, the offset to resume from, and whether the
// stream said it was closed. With STOP_AFTER_CHARS it stops once it has read that much.
import { stream } from "@durable-streams/client";

const [url, live, offset, stopAfter] = process.argv.slice(2);
const res = await stream({ url, live, offset: offset || undefined });
let text = "";
let last = offset || "-1";
let closed = false;
await new Promise((resolve, reject) => {
  res.subscribeText((chunk) => {
    text += chunk.text;
    last = chunk.offset;
    if (chunk.streamClosed) {
      closed = true;
      resolve();
    } else if (stopAfter && text.length >= Number(stopAfter)) {
      resolve();
    }
  });
  // The session may count itself closed as soon as its last response is queued, before the
  // subscriber has read it: the subscriber's streamClosed is the end. This only ends a read
  // that never saw it (which the tests then report), and passes errors on.
  res.closed.then(() => setTimeout(resolve, 2000), reject);
});
res.cancel();
process.stdout.write(JSON.stringify({ text, offset: last, closed }) + "\n");
process.exit(0);
