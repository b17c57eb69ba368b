"""Drives keygate's key API with the real Appwrite Python SDK (run by tests/sdk.rs).

Environment: KEYGATE_ENDPOINT (…/v1), KEYGATE_PROJECT, KEYGATE_KEY (holds keys.read,
keys.write, users.read), KEYGATE_TARGET (id of a key this script may change and delete).
Exits non-zero with a message on the first failed expectation.
"""

import os
import sys

from appwrite.client import Client
from appwrite.exception import AppwriteException
from appwrite.query import Query
from appwrite.services.project import Project


def expect(condition, message):
    if not condition:
        print(f"FAILED: {message}", file=sys.stderr)
        sys.exit(1)


def client(key):
    return (
        Client()
        .set_endpoint(os.environ["KEYGATE_ENDPOINT"])
        .set_project(os.environ["KEYGATE_PROJECT"])
        .set_key(key)
    )


def main():
    target = os.environ["KEYGATE_TARGET"]
    project = Project(client(os.environ["KEYGATE_KEY"]))

    listed = project.list_keys()
    expect(listed.total >= 2, f"list total {listed.total}")
    ids = [k.id for k in listed.keys]
    expect(target in ids, f"{target} not in {ids}")
    expect(all(k.secret == "" for k in listed.keys), "list returned a secret")

    filtered = project.list_keys(queries=[Query.equal("name", ["sdk-target"]), Query.limit(1)])
    expect([k.id for k in filtered.keys] == [target], f"filtered {filtered}")

    key = project.get_key(target)
    expect(key.name == "sdk-target" and key.secret == "", f"get {key}")

    updated = project.update_key(target, "renamed by python", ["users.read"])
    expect(updated.name == "renamed by python", f"update {updated}")
    expect(updated.expire == "", "PUT without expire must clear it")

    ephemeral = project.create_ephemeral_key(["users.read"], 60)
    expect(ephemeral.secret.startswith("ephemeral_"), "ephemeral secret shape")

    # The ephemeral key on a proxied route (SDK 27 sends the project per call, not globally).
    echo = client(ephemeral.secret).call(
        "get",
        "/users",
        {"content-type": "application/json", "x-appwrite-project": os.environ["KEYGATE_PROJECT"]},
        {},
    )
    expect(echo["target"].startswith("/v1/users"), f"proxied {echo}")
    expect(echo["headers"]["x-keygate-key-id"] == ["ephemeral"], f"identity {echo}")

    try:
        project.create_ephemeral_key(["users.write"], 60)
        expect(False, "an ephemeral key beyond the caller's scopes was minted")
    except AppwriteException as e:
        expect(e.code == 403 and e.type == "key_scopes_exceeded", f"escalation: {e.code} {e.type}")

    project.delete_key(target)
    try:
        project.get_key(target)
        expect(False, "deleted key still readable")
    except AppwriteException as e:
        expect(e.code == 404 and e.type == "key_not_found", f"after delete: {e.code} {e.type}")
    print("python sdk: ok")


if __name__ == "__main__":
    main()
