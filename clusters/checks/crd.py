"""KubeRay's own schemas: the RayCluster and RayJob CRDs of the oldest KubeRay the manifests support.

KUBERAY_VERSION is that version, 1.7.0: the first release whose RayCluster has
`workerGroupSpecs[].priority` (ray-operator/apis/ray/v1/raycluster_types.go, absent in v1.6.2), which
the spot-before-on-demand ordering needs; `authOptions` (token authentication with a Secret of your
own), `autoscalerOptions.version` and `autoscalerOptions.env` are older. The schemas ship beside this
file (kuberay-1.7.0.json): KubeRay's generated CRDs (ray-operator/config/crd/bases/ray.io_rayclusters.yaml
and ray.io_rayjobs.yaml at tag v1.7.0), descriptions left out and repeated subtrees (the pod template,
five times) stored once. Regenerate them from a KubeRay checkout with

    git -C kuberay checkout v1.7.0
    python clusters/checks/crd.py kuberay/ray-operator/config/crd/bases 1.7.0

A manifest is validated as `kubectl apply` validates it by default (strict field validation): an
unknown field is an error, and so is a wrong type, a missing required field or a value outside an
enum. The CRDs' CEL rules (x-kubernetes-validations) are not evaluated here.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import jsonschema

KUBERAY_VERSION = "1.7.0"
SCHEMA_PATH = Path(__file__).with_name(f"kuberay-{KUBERAY_VERSION}.json")
KINDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
SHARED_MIN_CHARS = 2000  # a repeated subtree this large is stored once, under "definitions"


# ------------------------------------------------------------------------------ generating


def _without_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _without_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [_without_descriptions(v) for v in node]
    return node


def _key(node: Any) -> str:
    return json.dumps(node, sort_keys=True, separators=(",", ":"))


def _count(node: Any, counts: dict[str, int], schema: bool = True) -> None:
    """How often each large schema occurs (a `properties` map is a map of schemas, not a schema)."""
    if isinstance(node, dict):
        text = _key(node)
        if schema and len(text) >= SHARED_MIN_CHARS:
            counts[text] = counts.get(text, 0) + 1
        for key, value in node.items():
            _count(value, counts, schema=not (schema and key == "properties"))
    elif isinstance(node, list):
        for value in node:
            _count(value, counts)


def _share(
    node: Any, counts: dict[str, int], definitions: dict[str, Any], top: bool = False, schema: bool = True
) -> Any:
    """`node` with every repeated large schema replaced by a $ref to one copy in `definitions`."""
    if isinstance(node, list):
        return [_share(v, counts, definitions) for v in node]
    if not isinstance(node, dict):
        return node
    text = _key(node)
    if schema and not top and counts.get(text, 0) > 1:
        name = hashlib.sha256(text.encode()).hexdigest()[:12]
        if name not in definitions:
            definitions[name] = None  # reserved before recursing: a subtree never contains itself
            definitions[name] = _share(node, counts, definitions, top=True)
        return {"$ref": f"#/definitions/{name}"}
    return {k: _share(v, counts, definitions, schema=not (schema and k == "properties")) for k, v in node.items()}


def build_schemas(crd_dir: Path, version: str) -> dict:
    """The vendored file's content, from KubeRay's CRD directory (ray-operator/config/crd/bases)."""
    import yaml

    schemas = {}
    for kind, name in KINDS.items():
        crd = yaml.safe_load((crd_dir / name).read_text())
        served = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
        schemas[kind] = _without_descriptions(served["schema"]["openAPIV3Schema"])
    counts: dict[str, int] = {}
    _count(schemas, counts)
    definitions: dict[str, Any] = {}
    shared = {kind: _share(schema, counts, definitions, top=True) for kind, schema in schemas.items()}
    return {
        "kuberay": version,
        "source": f"ray-operator/config/crd/bases/{{{','.join(KINDS.values())}}} at tag v{version}, "
        "descriptions removed, repeated subtrees under definitions (clusters/checks/crd.py)",
        "definitions": definitions,
        **shared,
    }


# ------------------------------------------------------------------------------ validating


def _as_json_schema(node: Any) -> Any:
    """Kubernetes' structural OpenAPI v3 schema, read as JSON Schema with kubectl's strict field validation."""
    if isinstance(node, list):
        return [_as_json_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: _as_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable"):
        kind = out.get("type")
        if isinstance(kind, str):
            out["type"] = [kind, "null"]
    out.pop("nullable", None)
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@functools.cache
def _validators() -> dict[str, jsonschema.Draft7Validator]:
    vendored = json.loads(SCHEMA_PATH.read_text())
    definitions = _as_json_schema(vendored["definitions"])
    return {
        kind: jsonschema.Draft7Validator({**_as_json_schema(vendored[kind]), "definitions": definitions})
        for kind in KINDS
    }


def pod_template_validator() -> jsonschema.Draft7Validator:
    """Kubernetes' PodTemplateSpec as KubeRay 1.7.0's CRD embeds it (for the other pods of the manifests)."""
    cluster = _validators()["RayCluster"].schema
    node = cluster
    for key in ("spec", "headGroupSpec", "template"):
        while "$ref" in node:
            node = cluster["definitions"][node["$ref"].rsplit("/", 1)[-1]]
        node = node["properties"][key]
    return jsonschema.Draft7Validator({**node, "definitions": cluster["definitions"]})


def _where(doc: Any, path: list) -> str:
    """A document path as the messages name it: list items by their groupName or name."""
    parts, node = [], doc
    for part in path:
        if isinstance(part, int):
            name = node[part].get("groupName") or node[part].get("name") if isinstance(node[part], dict) else None
            parts[-1] += f"[{name or part}]"
        else:
            parts.append(str(part))
        node = node[part]
    return ".".join(parts) or "<top level>"


def schema_problems(doc: Any, validator: jsonschema.Draft7Validator, source: str) -> list[str]:
    """Every error of `doc` against `validator`, one line each, the unknown fields with the nearest known one."""
    problems = []
    for error in sorted(validator.iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path]):
        at = _where(doc, list(error.absolute_path))
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            known = set(error.schema.get("properties", {}))
            for key in sorted(set(error.instance) - known):
                close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                problems.append(f"{at}: unknown field {key!r}{hint} [{source}]")
            continue
        message = error.message if len(error.message) < 200 else error.message[:200] + "..."
        problems.append(f"{at}: {message} [{source}]")
    return problems


def crd_problems(doc: dict) -> list[str]:
    """A RayCluster or RayJob against KubeRay's CRD of KUBERAY_VERSION (other kinds: nothing to say)."""
    validator = _validators().get(doc.get("kind"))
    return schema_problems(doc, validator, f"KubeRay {KUBERAY_VERSION} CRD") if validator else []


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python clusters/checks/crd.py KUBERAY/ray-operator/config/crd/bases VERSION", file=sys.stderr)
        return 2
    crd_dir, version = Path(argv[0]), argv[1]
    out = Path(__file__).with_name(f"kuberay-{version}.json")
    out.write_text(json.dumps(build_schemas(crd_dir, version), indent=1, sort_keys=True) + "\n")
    print(f"wrote {out.name} ({out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
