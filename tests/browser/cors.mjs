// Headless Chromium against keygate's origin check and CORS grants (run by tests/browser.rs).
// Env: KEYGATE (http://host:port), ALLOWED and OTHER (page origins), DEV_KEY, PROJECT.
// Each case opens a page on an origin and fetches keygate from inside it, as a web app would.
import { chromium } from 'playwright-core';

const env = (name) => {
  const value = process.env[name];
  if (!value) {
    console.log(`FAILED: env ${name} is not set`);
    process.exit(1);
  }
  return value;
};
const KEYGATE = env('KEYGATE');
const ALLOWED = env('ALLOWED');
const OTHER = env('OTHER');
const DEV_KEY = env('DEV_KEY');
const PROJECT = env('PROJECT');

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  timeout: 60_000,
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
});

// Opens `origin` in a fresh context and fetches `path` on keygate from that page.
async function fetchFrom(origin, path, headers) {
  const context = await browser.newContext();
  try {
    const page = await context.newPage();
    await page.goto(`${origin}/`, { timeout: 30_000 });
    return await page.evaluate(
      async ({ url, headers }) => {
        try {
          const response = await fetch(url, { headers });
          const text = await response.text();
          let body;
          try {
            body = JSON.parse(text);
          } catch {
            body = text;
          }
          return { status: response.status, body };
        } catch (e) {
          return { error: String(e) };
        }
      },
      { url: `${KEYGATE}${path}`, headers },
    );
  } finally {
    await context.close();
  }
}

const cases = [
  {
    name: 'a. allowed origin, guest scope',
    origin: ALLOWED,
    path: '/v1/locale',
    headers: { 'X-Appwrite-Project': PROJECT },
    check: (r) => r.status === 200 && r.body?.target === '/v1/locale',
  },
  {
    name: 'b. other origin, blocked by CORS',
    origin: OTHER,
    path: '/v1/locale',
    headers: { 'X-Appwrite-Project': PROJECT },
    check: (r) => r.status === undefined && /TypeError: Failed to fetch/.test(r.error ?? ''),
  },
  {
    name: 'c. other origin with a dev key, through the origin check',
    origin: OTHER,
    path: '/v1/locale',
    headers: { 'X-Appwrite-Project': PROJECT, 'X-Appwrite-Dev-Key': DEV_KEY },
    check: (r) => r.status === 200 && r.body?.target === '/v1/locale',
  },
  {
    name: 'd. other origin with a dev key, still no scope',
    origin: OTHER,
    path: '/v1/users',
    headers: { 'X-Appwrite-Project': PROJECT, 'X-Appwrite-Dev-Key': DEV_KEY },
    check: (r) => r.status === 401 && r.body?.type === 'general_unauthorized_scope',
  },
];

let failed = 0;
try {
  for (const c of cases) {
    const result = await fetchFrom(c.origin, c.path, c.headers);
    // The echo upstream's answer is long; what it received is enough to show.
    const shown = JSON.stringify(
      result.body?.target ? { status: result.status, echoed: `${result.body.method} ${result.body.target}` } : result,
    );
    if (c.check(result)) {
      console.log(`${c.name}: ${shown}`);
    } else {
      failed += 1;
      console.log(`FAILED: ${c.name} (from ${c.origin} GET ${c.path}): ${shown}`);
    }
  }
} finally {
  await browser.close();
}
if (failed > 0) {
  console.log(`browser: ${failed} of ${cases.length} cases FAILED`);
  process.exit(1);
}
console.log('browser: ok');
