// Drives keygate's key API with the real node-appwrite SDK (run by tests/sdk.rs).
// Environment as for keys_sdk.py. Exits non-zero on the first failed expectation.
import { Client, Project, Query, AppwriteException } from "node-appwrite";

function expect(condition, message) {
  if (!condition) {
    console.error(`FAILED: ${message}`);
    process.exit(1);
  }
}

const client = (key) =>
  new Client()
    .setEndpoint(process.env.KEYGATE_ENDPOINT)
    .setProject(process.env.KEYGATE_PROJECT)
    .setKey(key);

const target = process.env.KEYGATE_TARGET;
const project = new Project(client(process.env.KEYGATE_KEY));

const listed = await project.listKeys({});
expect(listed.total >= 2, `list total ${listed.total}`);
expect(listed.keys.some((k) => k.$id === target), `${target} missing`);
expect(listed.keys.every((k) => k.secret === ""), "list returned a secret");

const filtered = await project.listKeys({ queries: [Query.equal("name", ["sdk-target"]), Query.limit(1)] });
expect(filtered.keys.length === 1 && filtered.keys[0].$id === target, `filtered ${JSON.stringify(filtered)}`);

const key = await project.getKey({ keyId: target });
expect(key.name === "sdk-target" && key.secret === "", `get ${JSON.stringify(key)}`);

const updated = await project.updateKey({ keyId: target, name: "renamed by node", scopes: ["users.read"] });
expect(updated.name === "renamed by node" && updated.expire === "", `update ${JSON.stringify(updated)}`);

const ephemeral = await project.createEphemeralKey({ scopes: ["users.read"], duration: 60 });
expect(ephemeral.secret.startsWith("ephemeral_"), "ephemeral secret shape");

// The ephemeral key on a proxied route.
const response = await fetch(`${process.env.KEYGATE_ENDPOINT}/users`, {
  headers: { "X-Appwrite-Project": process.env.KEYGATE_PROJECT, "X-Appwrite-Key": ephemeral.secret },
});
expect(response.status === 200, `proxied status ${response.status}`);
const echo = await response.json();
expect(echo.headers["x-keygate-key-id"][0] === "ephemeral", `identity ${JSON.stringify(echo)}`);

try {
  await project.createEphemeralKey({ scopes: ["users.write"], duration: 60 });
  expect(false, "an ephemeral key beyond the caller's scopes was minted");
} catch (e) {
  expect(e instanceof AppwriteException && e.code === 403 && e.type === "key_scopes_exceeded", `escalation: ${e}`);
}

await project.deleteKey({ keyId: target });
try {
  await project.getKey({ keyId: target });
  expect(false, "deleted key still readable");
} catch (e) {
  expect(e.code === 404 && e.type === "key_not_found", `after delete: ${e}`);
}
console.log("node sdk: ok");
