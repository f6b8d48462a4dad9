"""Checks the Kubernetes manifests of deploy/k8s; run by scripts/validate-deploy.sh in its venv.

usage: validate-deploy.py K8S_DIR DEFAULT_TOML KUBE_VERSION... [--built FILE]

1. kustomization.yaml lists every manifest of the directory, and only existing files.
2. Every object validates strictly (unknown fields are errors) against the Kubernetes OpenAPI
   schemas that kubernetes-validate bundles, for each KUBE_VERSION; a kind/apiVersion without a
   schema is an error too (kubernetes-validate's CLI only warns about those). Duplicate YAML keys
   are errors.
3. What a schema cannot see: Deployment selectors match their pod labels and do not overlap;
   Services, PodDisruptionBudgets and HPAs point at existing Deployments and named ports; every
   ConfigMap/Secret a pod refers to exists with the key it names; a canary Deployment runs a
   different image than its stable twin.
4. Kairos's configuration: every key of a *.toml in a ConfigMap and every KAIROS_* variable (pod
   env, ConfigMap, Secret) is a key of crates/kairos/src/default.toml with a value of its type
   (the binary rejects unknown keys), and KAIROS_INGEST__SOURCES is a valid list of sources.

With --built FILE (the output of `kubectl kustomize K8S_DIR`), step 2 also runs on the built objects.
Exits 1 when anything fails, printing every error.
"""

import glob
import os
import sys
import tomllib

import yaml
import kubernetes_validate
from kubernetes_validate import SchemaNotFoundError, ValidationError

errors = []


def error(where, msg):
    errors.append(f"{where}: {msg}")


class StrictLoader(yaml.SafeLoader):
    """A SafeLoader that rejects duplicate keys (the API server's strict decoding does too)."""


def _mapping(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)


def load_docs(path):
    try:
        with open(path) as f:
            return [d for d in yaml.load_all(f, Loader=StrictLoader) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        error(path, f"not readable YAML: {e}")
        return []


def name_of(obj):
    return f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"


# 1. kustomization.yaml <-> the directory's files.
def check_kustomization(k8s_dir):
    kpath = os.path.join(k8s_dir, "kustomization.yaml")
    if not os.path.isfile(kpath):
        error(kpath, "missing")
        return []
    docs = load_docs(kpath)
    if len(docs) != 1 or not isinstance(docs[0], dict):
        error(kpath, "must hold one Kustomization")
        return []
    k = docs[0]
    if k.get("kind") != "Kustomization" or not str(k.get("apiVersion", "")).startswith(
            "kustomize.config.k8s.io/"):
        error(kpath, "kind/apiVersion is not a kustomize Kustomization")
    resources = k.get("resources") or []
    if len(resources) != len(set(resources)):
        error(kpath, "resources lists a file twice")
    for r in resources:
        if not os.path.isfile(os.path.join(k8s_dir, r)):
            error(kpath, f"resources lists {r}, which does not exist")
    on_disk = {os.path.basename(p) for ext in ("yaml", "yml")
               for p in glob.glob(os.path.join(k8s_dir, f"*.{ext}"))}
    on_disk.discard("kustomization.yaml")
    for f in sorted(on_disk - set(resources)):
        error(kpath, f"{f} is in the directory but not in resources")
    return [os.path.join(k8s_dir, r) for r in resources
            if os.path.isfile(os.path.join(k8s_dir, r))]


# 2. Strict schema validation.
def check_schemas(objects, versions):
    for path, obj in objects:
        if not isinstance(obj, dict) or "kind" not in obj or "apiVersion" not in obj:
            error(path, "a document without kind and apiVersion")
            continue
        for v in versions:
            try:
                kubernetes_validate.validate(obj, v, strict=True)
            except ValidationError as e:
                at = ".".join(str(p) for p in e.path) or "(top level)"
                error(path, f"{name_of(obj)} against Kubernetes {v}: {at}: {e.message}")
            except SchemaNotFoundError as e:
                error(path, f"{name_of(obj)}: {e.message}")
            except Exception as e:  # VersionNotSupportedError, unresolvable schemas
                error(path, f"{name_of(obj)} against Kubernetes {v}: "
                      f"{getattr(e, 'message', None) or e!r}")


# 3. References between objects.
def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_references(objects):
    by_kind = {}
    for path, obj in objects:
        if not isinstance(obj, dict):
            continue
        key = (obj.get("kind"), (obj.get("metadata") or {}).get("name"))
        if key in by_kind.get(key[0], {}):
            error(path, f"{name_of(obj)} is defined twice")
        by_kind.setdefault(key[0], {})[key[1]] = (path, obj)

    def data_keys(kind, name):
        if name not in by_kind.get(kind, {}):
            return None
        o = by_kind[kind][name][1]
        return set(o.get("data") or {}) | set(o.get("stringData") or {}) | set(
            o.get("binaryData") or {})

    deployments = by_kind.get("Deployment", {})
    pods = {}  # deployment name -> (template labels, containers)
    for name, (path, d) in deployments.items():
        spec = d.get("spec") or {}
        sel = ((spec.get("selector") or {}).get("matchLabels")) or {}
        tmpl = spec.get("template") or {}
        labels = ((tmpl.get("metadata") or {}).get("labels")) or {}
        pspec = tmpl.get("spec") or {}
        containers = pspec.get("containers") or []
        pods[name] = (labels, containers)
        where = f"{path}: Deployment/{name}"
        if not matches(sel, labels):
            error(where, f"selector {sel} does not match the pod labels {labels}")
        for c in containers:
            ports = {p.get("name") for p in c.get("ports") or []}
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                port = ((c.get(probe) or {}).get("httpGet") or {}).get("port")
                if isinstance(port, str) and port not in ports:
                    error(where, f"{probe} uses port {port!r}, which the container does not name")
            for e in c.get("env") or []:
                vf = e.get("valueFrom") or {}
                for ref, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                    r = vf.get(ref)
                    if r and not r.get("optional"):
                        keys = data_keys(kind, r.get("name"))
                        if keys is None:
                            error(where, f"env {e.get('name')}: {kind} {r.get('name')} is not defined here")
                        elif r.get("key") not in keys:
                            error(where, f"env {e.get('name')}: {kind} {r.get('name')} has no key {r.get('key')!r}")
            for ef in c.get("envFrom") or []:
                for ref, kind in (("secretRef", "Secret"), ("configMapRef", "ConfigMap")):
                    r = ef.get(ref)
                    if r and not r.get("optional") and data_keys(kind, r.get("name")) is None:
                        error(where, f"envFrom: {kind} {r.get('name')} is not defined here")
            mounts = {m.get("name") for m in c.get("volumeMounts") or []}
            volumes = {v.get("name") for v in pspec.get("volumes") or []}
            for m in sorted(mounts - volumes):
                error(where, f"volumeMount {m!r} has no volume")
            for r in ("requests", "limits"):
                for res in ("cpu", "memory"):
                    if res not in ((c.get("resources") or {}).get(r) or {}):
                        error(where, f"container {c.get('name')} has no {r}.{res}")
        for v in pspec.get("volumes") or []:
            for src, kind, field in (("configMap", "ConfigMap", "name"), ("secret", "Secret", "secretName")):
                s = v.get(src)
                if s and not s.get("optional") and data_keys(kind, s.get(field)) is None:
                    error(where, f"volume {v.get('name')}: {kind} {s.get(field)} is not defined here")
    for a, (la, _) in pods.items():
        for b in deployments:
            sel_b = (((deployments[b][1].get("spec") or {}).get("selector") or {}).get("matchLabels")) or {}
            if a != b and matches(sel_b, la):
                error(deployments[b][0], f"Deployment/{b}'s selector also matches Deployment/{a}'s pods")

    for name, (path, s) in by_kind.get("Service", {}).items():
        sel = (s.get("spec") or {}).get("selector") or {}
        hits = [d for d, (labels, _) in pods.items() if matches(sel, labels)]
        if not hits:
            error(path, f"Service/{name}: selector {sel} matches no Deployment's pods")
        for port in (s.get("spec") or {}).get("ports") or []:
            tp = port.get("targetPort")
            for d in hits:
                named = {p.get("name") for c in pods[d][1] for p in c.get("ports") or []}
                if isinstance(tp, str) and tp not in named:
                    error(path, f"Service/{name}: targetPort {tp!r} is not a port of Deployment/{d}")

    covered = {}
    for name, (path, p) in by_kind.get("PodDisruptionBudget", {}).items():
        sel = (((p.get("spec") or {}).get("selector") or {}).get("matchLabels")) or {}
        hits = [d for d, (labels, _) in pods.items() if matches(sel, labels)]
        if not hits:
            error(path, f"PodDisruptionBudget/{name}: selector matches no Deployment's pods")
        for d in hits:
            if d in covered:
                error(path, f"Deployment/{d}'s pods are selected by PodDisruptionBudgets "
                      f"{covered[d]} and {name}: evictions would fail")
            covered[d] = name
    for d in pods:
        if d not in covered:
            error(deployments[d][0], f"Deployment/{d} has no PodDisruptionBudget")

    for name, (path, h) in by_kind.get("HorizontalPodAutoscaler", {}).items():
        spec = h.get("spec") or {}
        ref = spec.get("scaleTargetRef") or {}
        where = f"{path}: HorizontalPodAutoscaler/{name}"
        if ref.get("kind") != "Deployment" or ref.get("name") not in deployments:
            error(where, f"scaleTargetRef {ref.get('kind')}/{ref.get('name')} is not a Deployment defined here")
            continue
        target = deployments[ref["name"]][1]
        if "replicas" in (target.get("spec") or {}):
            error(where, f"Deployment/{ref['name']} sets spec.replicas, which would fight the HPA on every apply")
        if spec.get("minReplicas", 1) > spec.get("maxReplicas", 0):
            error(where, "minReplicas is above maxReplicas")

    # A canary (label track=canary) runs another image than the stable Deployment of its app.
    for name, (labels, containers) in pods.items():
        if labels.get("track") != "canary":
            continue
        app = labels.get("app.kubernetes.io/name")
        stable = [d for d, (l, _) in pods.items() if d != name and l.get("track") == "stable"
                  and l.get("app.kubernetes.io/name") == app]
        if not stable:
            error(deployments[name][0], f"canary Deployment/{name} has no stable Deployment of {app}")
        for s in stable:
            if {c.get("image") for c in containers} == {c.get("image") for c in pods[s][1]}:
                error(deployments[name][0], f"canary Deployment/{name} runs the same image as Deployment/{s}")
    return by_kind


# 4. Kairos's configuration against its compiled-in defaults.
def same_type(default, value):
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    return isinstance(value, type(default))


def check_keys(where, defaults, table, prefix=""):
    for k, v in table.items():
        path = f"{prefix}{k}"
        if k not in defaults:
            error(where, f"{path} is not a Kairos setting (see crates/kairos/src/default.toml)")
        elif isinstance(defaults[k], dict):
            if isinstance(v, dict):
                check_keys(where, defaults[k], v, path + ".")
            else:
                error(where, f"{path} must be a table")
        elif isinstance(defaults[k], list) and defaults[k] and isinstance(defaults[k][0], dict):
            if not isinstance(v, list) or not all(isinstance(x, dict) for x in v):
                error(where, f"{path} must be an array of tables")
            else:
                for i, x in enumerate(v):
                    check_keys(where, defaults[k][0], x, f"{path}[{i}].")
        elif not same_type(defaults[k], v):
            error(where, f"{path} = {v!r}: expected a {type(defaults[k]).__name__}")


def check_sources(where, sources):
    keys = set()
    for s in sources if isinstance(sources, list) else []:
        for field in ("name", "write_key"):
            if not isinstance(s.get(field), str):
                error(where, f"source {s}: {field} is required")
        key = s.get("write_key")
        if key == "":
            error(where, f"source {s.get('name')!r}: write_key is empty")
        elif key in keys:
            error(where, f"source {s.get('name')!r}: write_key is used by another source")
        keys.add(key)
        for o in s.get("allowed_origins") or []:
            if o != "*" and not (isinstance(o, str) and o.split("://")[0] in ("http", "https")
                                 and "://" in o):
                error(where, f"source {s.get('name')!r}: origin {o!r} must be http(s)://host[:port] or *")


def check_env_var(where, defaults, name, value):
    """A KAIROS_* variable is a key path; its value is parsed as TOML when it can be (as the binary does)."""
    if not name.startswith("KAIROS_") or name == "KAIROS_CONFIG":
        return
    parts = [p.lower() for p in name[len("KAIROS_"):].split("__")]
    if value is None:
        parsed = None
    else:
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value
    table = {}
    t = table
    for p in parts[:-1]:
        t = t.setdefault(p, {})
    t[parts[-1]] = parsed if parsed is not None else _placeholder(defaults, parts)
    check_keys(f"{where}: {name}", defaults, table)
    if parts == ["ingest", "sources"] and parsed is not None:
        if isinstance(parsed, str):
            error(where, f"{name} is not a TOML array of inline tables")
        else:
            check_sources(f"{where}: {name}", parsed)


def _placeholder(defaults, parts):
    """The default value itself, for a variable whose value comes from elsewhere (valueFrom)."""
    d = defaults
    for p in parts:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def check_config(by_kind, default_toml):
    with open(default_toml, "rb") as f:
        defaults = tomllib.load(f)
    for kind in ("ConfigMap", "Secret"):
        for name, (path, o) in by_kind.get(kind, {}).items():
            for key, value in {**(o.get("data") or {}), **(o.get("stringData") or {})}.items():
                where = f"{path}: {kind}/{name}"
                if key.endswith(".toml"):
                    try:
                        table = tomllib.loads(value)
                    except tomllib.TOMLDecodeError as e:
                        error(where, f"{key} is not valid TOML: {e}")
                        continue
                    check_keys(f"{where}: {key}", defaults, table)
                    if "sources" in (table.get("ingest") or {}):
                        check_sources(f"{where}: {key}", table["ingest"]["sources"])
                else:
                    check_env_var(where, defaults, key, value)
    for name, (path, d) in by_kind.get("Deployment", {}).items():
        containers = ((((d.get("spec") or {}).get("template") or {}).get("spec") or {})
                      .get("containers") or [])
        for c in containers:
            for e in c.get("env") or []:
                check_env_var(f"{path}: Deployment/{name}", defaults, e.get("name", ""),
                              e.get("value") if "value" in e else None)


def main(argv):
    built = None
    if "--built" in argv:
        i = argv.index("--built")
        built = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    k8s_dir, default_toml, versions = argv[0], argv[1], argv[2:]
    files = check_kustomization(k8s_dir)
    objects = [(p, d) for p in files for d in load_docs(p)]
    check_schemas(objects, versions)
    by_kind = check_references(objects)
    check_config(by_kind, default_toml)
    built_count = None
    if built:
        built_objects = [(f"{built} (kubectl kustomize)", d) for d in load_docs(built)]
        built_count = len(built_objects)
        if built_count != len(objects):
            error(built, f"kustomize built {built_count} objects from {len(objects)}")
        check_schemas(built_objects, versions)
    if errors:
        for e in errors:
            print(f"ERROR {e}")
        print(f"{k8s_dir}: {len(errors)} error(s)")
        return 1
    kinds = sorted({o.get("kind") for _, o in objects})
    print(f"{len(files)} manifests, {len(objects)} objects ({', '.join(kinds)}): valid against "
          f"Kubernetes {', '.join(versions)} (strict, kubernetes-validate "
          f"{kubernetes_validate.__version__}); references and Kairos settings consistent"
          + (f"; kustomize build: {built_count} objects, valid" if built else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
