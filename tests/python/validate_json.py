"""Validates clipmask's JSON outputs against docs/schemas/ with the `jsonschema` package (draft
2020-12), for tests/it/json_schemas.rs.

Reads a JSON list on stdin: [{"name": str, "schema": path, "text": str, "lines": bool,
"valid": bool}]. `text` is the output as the command wrote it; with `lines` every non-empty line
is one document (JSON Lines). Each schema is first checked against the draft's metaschema.
A case with "valid": true must pass; one with "valid": false must be rejected (a case that
shows the schema is not vacuous). Prints one line per failed case; exit 1 when any failed.
"""
import json
import sys

import jsonschema


def documents(case):
    if case["lines"]:
        return [json.loads(line) for line in case["text"].splitlines() if line.strip()]
    return [json.loads(case["text"])]


def main():
    cases = json.load(sys.stdin)
    validators = {}
    failed = 0
    for case in cases:
        path = case["schema"]
        if path not in validators:
            with open(path, encoding="utf-8") as f:
                schema = json.load(f)
            jsonschema.Draft202012Validator.check_schema(schema)
            validators[path] = jsonschema.Draft202012Validator(schema)
        validator = validators[path]
        docs = documents(case)
        if not docs:
            print(f"{case['name']}: no JSON document in the output")
            failed += 1
            continue
        for i, doc in enumerate(docs):
            errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
            if case["valid"] and errors:
                failed += 1
                for e in errors[:5]:
                    where = "/".join(str(p) for p in e.absolute_path) or "(top)"
                    print(f"{case['name']} [doc {i}] at {where}: {e.message[:300]}")
            elif not case["valid"] and not errors:
                failed += 1
                print(f"{case['name']} [doc {i}]: accepted, but the schema should reject it")
    print(f"{len(cases)} cases, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
