"""The MeshConfig CRD checked against its own schema (run by tests/tests/deploy_validate.rs).

usage: validate_crd.py CRD.yaml INSTANCE.yaml...

- the CRD names the group, kind, scope and version the agent watches, and its schema is a valid
  schema (OpenAPI v3 schemas are JSON Schema draft 4 plus x-kubernetes-* extensions);
- every instance validates against the served version's openAPIV3Schema;
- copies of the first instance broken in ways the API server must refuse are refused, so the
  check above is not vacuous.
"""
import copy
import sys

import jsonschema
import yaml


def fail(msg):
    print(f"MeshConfig CRD check: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    crd_path, *instance_paths = sys.argv[1:]
    docs = [d for d in yaml.safe_load_all(open(crd_path)) if d]
    crds = [d for d in docs if d.get("kind") == "CustomResourceDefinition"]
    if len(crds) != 1:
        fail(f"{crd_path}: expected one CustomResourceDefinition, found {len(crds)}")
    crd = crds[0]
    spec = crd["spec"]
    want = ("config.flomesh.io", "MeshConfig", "meshconfigs", "Namespaced")
    got = (spec.get("group"), spec["names"].get("kind"), spec["names"].get("plural"), spec.get("scope"))
    if got != want:
        fail(f"{crd_path}: group/kind/plural/scope {got}, expected {want}")
    versions = {v["name"]: v for v in spec["versions"]}
    v = versions.get("v1alpha3")
    if not v or not v.get("served") or not v.get("storage"):
        fail(f"{crd_path}: v1alpha3 must be served and stored, versions: {list(versions)}")
    schema = v["schema"]["openAPIV3Schema"]
    jsonschema.Draft4Validator.check_schema(schema)
    validator = jsonschema.Draft4Validator(schema)

    first = None
    for path in instance_paths:
        for inst in (d for d in yaml.safe_load_all(open(path)) if d):
            if (inst.get("apiVersion"), inst.get("kind")) != ("config.flomesh.io/v1alpha3", "MeshConfig"):
                fail(f"{path}: not a config.flomesh.io/v1alpha3 MeshConfig")
            errors = sorted(validator.iter_errors(inst), key=str)
            if errors:
                fail(f"{path}: {inst['metadata']['name']} does not validate: "
                     + "; ".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors))
            first = first or inst
            print(f"    MeshConfig {inst['metadata']['name']} ({path}): valid against the CRD")
    if first is None:
        fail("no instance given")

    def broken(what, change):
        bad = copy.deepcopy(first)
        change(bad["spec"]["traffic"])
        if validator.is_valid(bad):
            fail(f"the CRD schema accepts {what}")
        print(f"    the CRD schema refuses {what}")

    broken("a port as a string", lambda t: t.update(outboundPortExclusionList=["5432"]))
    broken("port 70000", lambda t: t.update(outboundPortExclusionList=[70000]))
    broken("a CIDR list that is not a list", lambda t: t.update(outboundIPRangeExclusionList="10.0.0.0/8"))
    broken("enableEgress as a string", lambda t: t.update(enableEgress="no"))


if __name__ == "__main__":
    main()
