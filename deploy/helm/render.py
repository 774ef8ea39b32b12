#!/usr/bin/env python3
"""Lint and render the broker chart with Helm itself, then validate what it renders.

Helm comes from the `helm-sdkpy` package: the Helm v4 Go library compiled into a shared
object with Python bindings (no helm binary is installable from the registries this project
uses). Its bindings offer lint and install but no `template`, so rendering is a real
`helm install` against a small in-process stand-in for the Kubernetes API server (discovery,
OpenAPI index, a store for created objects, Job watches reporting completion). Everything Helm
does on the way (values merge, schema of Chart.yaml, template rendering, hook ordering,
manifest sorting) is Helm's own; the stand-in only answers. The manifests come from the
release Helm returns (`manifest` plus `hooks`), exactly as it would apply them.

Usage: render.py CHART OUT_DIR VALUES.yaml...  (writes OUT_DIR/<values name>.yaml)
       render.py --expect-fail CHART VALUES.yaml MESSAGE  (rendering must fail with MESSAGE)
       render.py --lint CHART
"""

import asyncio
import http.server
import itertools
import json
import os
import re
import sys
import tempfile
import threading
import urllib.parse

import yaml

# The API groups the chart uses, with their resources (plural, kind).
GROUPS = {
    "v1": [("secrets", "Secret"), ("configmaps", "ConfigMap"), ("services", "Service"),
           ("serviceaccounts", "ServiceAccount"), ("pods", "Pod")],
    "apps/v1": [("deployments", "Deployment")],
    "batch/v1": [("jobs", "Job")],
    "policy/v1": [("poddisruptionbudgets", "PodDisruptionBudget")],
    "autoscaling/v2": [("horizontalpodautoscalers", "HorizontalPodAutoscaler")],
    "networking.k8s.io/v1": [("networkpolicies", "NetworkPolicy")],
    "monitoring.coreos.com/v1": [("servicemonitors", "ServiceMonitor")],
}
KUBE_MINOR = "31"


def _split(gv):
    return gv.split("/") if "/" in gv else ("", gv)


def _base(gv):
    return "/api/v1" if gv == "v1" else f"/apis/{gv}"


class FakeApi(http.server.BaseHTTPRequestHandler):
    """Just enough of the Kubernetes API for `helm install` to run to completion."""

    protocol_version = "HTTP/1.1"
    store = {}
    rv = itertools.count(1)

    def log_message(self, *_):
        pass

    def _send(self, code, obj, stream=None):
        body = stream if stream is not None else json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _not_found(self):
        self._send(404, {"kind": "Status", "apiVersion": "v1", "metadata": {},
                         "status": "Failure", "reason": "NotFound", "code": 404})

    def _body(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}"
        if "protobuf" in (self.headers.get("Content-Type") or ""):
            # Helm's release record (a Secret), sent as protobuf by client-go: keep its name.
            m = re.search(rb"sh\.helm\.release\.v1\.[a-z0-9.-]+", raw)
            return {"metadata": {"name": m.group(0).decode() if m else "release"}}
        return json.loads(raw)

    def _openapi(self, path):
        if path == "/openapi/v3":
            return {"paths": {_base(gv).lstrip("/"): {"serverRelativeURL": f"/openapi/v3{_base(gv)}?hash=0"}
                              for gv in GROUPS}}
        gv = re.sub(r"^/openapi/v3/apis?/", "", path)
        g, v = _split(gv)
        params = [{"name": "fieldValidation", "in": "query", "schema": {"type": "string"}}]
        # Creates accept fieldValidation, so client-go leaves validation to the "server"
        # (the real validation runs afterwards against the Kubernetes schemas).
        paths = {f"{_base(gv)}/namespaces/{{namespace}}/{r}": {
            op: {"x-kubernetes-group-version-kind": {"group": g, "version": v, "kind": k},
                 "parameters": params, "responses": {}} for op in ("post", "patch")}
            for r, k in GROUPS.get(gv, [])}
        return {"openapi": "3.0.0", "info": {"title": "stand-in", "version": v}, "paths": paths}

    def _route(self):
        u = urllib.parse.urlparse(self.path)
        q = urllib.parse.parse_qs(u.query)
        if u.path == "/version":
            return self._send(200, {"major": "1", "minor": KUBE_MINOR,
                                    "gitVersion": f"v1.{KUBE_MINOR}.0", "platform": "linux/amd64"})
        if u.path.startswith("/openapi/v3"):
            return self._send(200, self._openapi(u.path))
        if u.path == "/api":
            return self._send(200, {"kind": "APIVersions", "versions": ["v1"]})
        if u.path == "/apis":
            groups = [{"name": g, "versions": [{"groupVersion": gv, "version": v}],
                       "preferredVersion": {"groupVersion": gv, "version": v}}
                      for gv in GROUPS if "/" in gv for g, v in [gv.split("/")]]
            return self._send(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
        parts = u.path.strip("/").split("/")
        if parts[0] == "api":
            gv, rest = parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 3:
            gv, rest = "/".join(parts[1:3]), parts[3:]
        else:
            return self._not_found()
        if gv not in GROUPS:
            return self._not_found()
        if not rest:
            return self._send(200, {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv,
                                    "resources": [{"name": r, "singularName": k.lower(), "namespaced": True,
                                                   "kind": k, "verbs": ["create", "delete", "get", "list",
                                                                        "patch", "update", "watch"]}
                                                  for r, k in GROUPS[gv]]})
        if len(rest) < 3 or rest[0] != "namespaces":
            return self._not_found()
        ns, res, name = rest[1], rest[2], rest[3] if len(rest) > 3 else None
        kind = dict(GROUPS[gv]).get(res)
        if kind is None:
            return self._not_found()
        if self.command == "GET" and name is None:
            items = [o for (g, r, n, _), o in self.store.items() if (g, r, n) == (gv, res, ns)]
            for cond in filter(None, q.get("labelSelector", [""])[0].split(",")):
                k, _, v = cond.partition("=")
                items = [o for o in items if o["metadata"].get("labels", {}).get(k) == v]
            if q.get("watch", ["false"])[0] in ("true", "1"):
                # Initial events, then the bookmark that ends them (sendInitialEvents).
                events = [{"type": "ADDED", "object": o} for o in items]
                events.append({"type": "BOOKMARK", "object": {
                    "kind": kind, "apiVersion": gv, "metadata": {
                        "resourceVersion": str(next(self.rv)),
                        "annotations": {"k8s.io/initial-events-end": "true"}}}})
                return self._send(200, None, b"".join(json.dumps(e).encode() + b"\n" for e in events))
            return self._send(200, {"kind": kind + "List", "apiVersion": gv,
                                    "metadata": {"resourceVersion": str(next(self.rv))}, "items": items})
        if self.command == "GET":
            o = self.store.get((gv, res, ns, name))
            return self._send(200, o) if o else self._not_found()
        if self.command in ("POST", "PUT", "PATCH"):
            o = self._body()
            name = name or o["metadata"]["name"]
            o.setdefault("metadata", {}).update({"namespace": ns, "uid": f"uid-{next(self.rv)}",
                                                 "resourceVersion": str(next(self.rv))})
            o.update({"apiVersion": gv, "kind": kind})
            if kind == "Job":
                # The migration hook "ran": Helm waits for hook Jobs to complete.
                o["status"] = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
            self.store[(gv, res, ns, name)] = o
            return self._send(201 if self.command == "POST" else 200, o)
        if self.command == "DELETE":
            self.rfile.read(int(self.headers.get("Content-Length") or 0))  # delete options
            self.store.pop((gv, res, ns, name), None)
            return self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})
        return self._not_found()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _route


def _kubeconfig(port, directory):
    path = os.path.join(directory, "kubeconfig")
    with open(path, "w") as f:
        yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "s", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
            "users": [{"name": "u", "user": {"token": "stand-in"}}],
            "contexts": [{"name": "c", "context": {"cluster": "s", "user": "u", "namespace": "broker"}}],
        }, f)
    return path


def render(chart, values):
    """`helm install` of `chart` with `values` against a fresh stand-in: the manifests, hooks
    first (as Helm applies them)."""
    import helm_sdkpy as helm

    FakeApi.store = {}
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeApi)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with tempfile.TemporaryDirectory() as d:
            cfg = helm.Configuration(namespace="broker", kubeconfig=_kubeconfig(srv.server_address[1], d))
            rel = asyncio.run(helm.Install(cfg).run("broker", chart, values=values, wait=False, timeout=60))
    finally:
        srv.shutdown()
    docs = [h["manifest"] for h in rel.get("hooks") or []]
    docs.append(rel["manifest"])
    docs = [re.sub(r"^(---\s*)+", "", d.strip()) for d in docs]
    return "\n---\n".join(d for d in docs if d) + "\n"


def lint(chart):
    import helm_sdkpy as helm

    with tempfile.TemporaryDirectory() as d:
        cfg = helm.Configuration(namespace="broker", kubeconfig=_kubeconfig(1, d))
        res = asyncio.run(helm.Lint(cfg).run(chart))
    # Severity: 1 info, 2 warning, 4 error (Helm's support.Severity).
    bad = [m for m in res.get("Messages") or [] if m.get("Severity", 0) >= 2]
    for m in res.get("Messages") or []:
        print(f"  lint [{m.get('Severity')}] {m.get('Path')}: {m.get('Err')}")
    return not bad and not res.get("Errors")


def main(argv):
    if argv[:1] == ["--lint"]:
        return 0 if lint(argv[1]) else 1
    if argv[:1] == ["--expect-fail"]:
        chart, values_file, message = argv[1:4]
        with open(values_file) as f:
            values = yaml.safe_load(f) or {}
        try:
            render(chart, values)
        except Exception as e:  # noqa: BLE001 - any Helm failure is what we want here
            if message in str(e):
                print(f"  refused as expected: {message}")
                return 0
            print(f"  refused, but not with {message!r}: {e}")
            return 1
        print(f"  rendered although it should fail with {message!r}")
        return 1
    chart, out_dir, value_files = argv[0], argv[1], argv[2:]
    os.makedirs(out_dir, exist_ok=True)
    for vf in value_files:
        with open(vf) as f:
            values = yaml.safe_load(f) or {}
        name = os.path.splitext(os.path.basename(vf))[0].removesuffix("-values")
        text = render(chart, values)
        header = f"# Rendered by Helm from deploy/helm/broker with {os.path.relpath(vf, os.path.dirname(chart))}.\n" \
                 "# Generated by deploy/check --update; do not edit.\n"
        with open(os.path.join(out_dir, f"{name}.yaml"), "w") as f:
            f.write(header + text)
        kinds = [d["kind"] for d in yaml.safe_load_all(text) if d]
        print(f"  {name}: {len(kinds)} objects: {', '.join(kinds)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
