"""Our graph JSON in circuit-tracer's own local viewer, in a real browser (headless Chromium).

circuit-tracer 0.5.0's frontend (its index.html and JS, from the wheel) is served by its own
``circuit_tracer.frontend.local_server.serve``. The page loads its libraries from CDNs; tests never
reach the network, so those requests are answered from the npm packages of the same libraries:
d3 v7 with jetpack (``d3-jetpack@2.3.0``'s ``d3v7+jetpack.js``, which the transformer-circuits
``d3.js`` + ``jetpack`` pair provides), ``dagre@0.8.5`` and ``pako@2.1.0`` (the versions the page
names). ``npy_v0.js`` (feature-example files, not used by the graph view) and the dev hot-reload
client are empty. ``make install`` fetches all of it into ``.cache/viewer`` (see the Makefile).
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from acgraph.attribution import attribute, load_transcoders
from acgraph.attribution.export import graph_json, write_graph_json
from acgraph.attribution.prune import prune
from acgraph.models import load_model

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / ".cache" / "viewer"
MODULES = CACHE / "node_modules"
CHROMIUM = Path("/usr/bin/chromium")
PROMPT = "c 4 ; a 9 ; b 3 ; a ?"
# d3-jetpack's own UMD builds do not attach to an existing d3 v7 (its d3v7+jetpack.js bundles two
# copies of d3-selection and patches the other one), so d3 v7 and d3-collection load as usual and
# jetpack runs as CommonJS with its d3 imports pointed at that d3 (queue/request: loadData only).
JETPACK_GLUE = """
;(function () {
  var module = {exports: {}}, exports = module.exports;
  var require = function (name) {
    return name === 'd3-queue' || name === 'd3-request' ? {} : window.d3;
  };
  %s;
  Object.assign(window.d3, module.exports);
  // the transformer-circuits jetpack build gives conventions() a c.drawAxis(svg) method;
  // d3-jetpack 2.3 exports the same function as d3.drawAxis(c)
  var conventions = window.d3.conventions;
  window.d3.conventions = function (c) {
    c = conventions(c);
    c.drawAxis = function (svg) {
      return window.d3.drawAxis(Object.assign({}, c, {svg: svg || c.svg}));
    };
    return c;
  };
})();
"""


def _d3_with_jetpack() -> str:
    *plain, jetpack = LIBRARIES["d3.js"]
    return ";\n".join(p.read_text() for p in plain) + JETPACK_GLUE % jetpack.read_text()


# the page's CDN scripts, by file name -> the files that answer them (none: an empty script)
LIBRARIES = {
    "d3.js": [  # jetpack last: see JETPACK_GLUE
        MODULES / "d3/dist/d3.js",
        MODULES / "d3-collection/dist/d3-collection.js",
        MODULES / "d3-jetpack/build/d3-jetpack.cjs",
    ],
    "jetpack_2024-07-20.js": [],  # loaded with d3.js
    "npy_v0.js": [],
    "hotserver-client-ws.js": [],
    "dagre.min.js": [MODULES / "dagre/dist/dagre.min.js"],
    "pako.min.js": [MODULES / "pako/dist/pako.min.js"],
}


def _script(name: str) -> str:
    return (
        _d3_with_jetpack() if name == "d3.js" else "\n".join(p.read_text() for p in LIBRARIES[name])
    )


# as the environment's probe starts it: no sandbox as root, no calls home on a closed network
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _require_viewer_deps():
    if not CHROMIUM.is_file():
        pytest.skip("Debian chromium is not installed (make install installs it when root)")
    missing = [str(p) for files in LIBRARIES.values() for p in files if not p.is_file()]
    assert not missing, f"viewer libraries missing (run make install): {missing}"
    assert (CACHE / "circuit_tracer" / "frontend" / "local_server.py").is_file()
    if str(CACHE) not in sys.path:
        sys.path.insert(0, str(CACHE))
    from circuit_tracer.frontend.local_server import serve

    playwright = pytest.importorskip("playwright.sync_api")
    return serve, playwright


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_circuit_tracer_viewer_renders_our_graph(tmp_path):
    serve, playwright = _require_viewer_deps()
    model = load_model("organism")
    graph = attribute(model, load_transcoders("organism", model), PROMPT)
    data = graph_json(graph, "lookup", result=prune(graph), vocab_size=model.cfg.d_vocab)
    write_graph_json(tmp_path / "graphs", data)
    logit = next(n for n in data["nodes"] if n["is_target_logit"])
    server = serve(data_dir=str(tmp_path / "graphs"), port=_free_port())
    port = server.httpd.server_address[1]
    errors: list[str] = []
    outside: list[str] = []

    def answer(route):
        name = route.request.url.split("?")[0].rsplit("/", 1)[-1]
        if name not in LIBRARIES:
            outside.append(route.request.url)
            return route.abort()
        return route.fulfill(status=200, content_type="application/javascript", body=_script(name))

    try:
        with playwright.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.route("https://**/*", answer)
            page.goto(f"http://127.0.0.1:{port}/index.html?slug=lookup")
            page.wait_for_selector("svg text.node", timeout=60_000)
            drawn = page.evaluate("d3.selectAll('svg text.node').data().map(d => d.node_id)")
            # click our target logit where the viewer drew it
            x, y = page.evaluate(
                "(() => { var r = d3.selectAll('svg text.node')"
                ".filter(d => d.feature_type == 'logit').node().getBoundingClientRect();"
                " return [r.x + r.width / 2, r.y + r.height / 2] })()"
            )
            page.mouse.click(x, y)
            page.wait_for_function(
                "document.querySelector('.node-connections').innerText.includes('Input')"
            )
            panel = page.locator(".node-connections").inner_text()
            page.screenshot(path=str(tmp_path / "viewer.png"))
            browser.close()
    finally:
        server.stop()
    assert not errors, errors
    assert not outside, f"the page asked for more than the known libraries: {outside}"
    # the viewer draws every node its own pruning slider keeps (tokens, logits, and features
    # and errors whose cumulative influence is within the graph's node_threshold)
    threshold = data["metadata"]["node_threshold"]
    shown = {
        n["node_id"]
        for n in data["nodes"]
        if n["feature_type"] in ("embedding", "logit") or n["influence"] <= threshold
    }
    assert sorted(drawn) == sorted(shown) and len(shown) >= 0.9 * len(data["nodes"])
    # the clicked logit's panel: its label, then its strongest inputs with our edge weights
    assert logit["clerp"] in panel
    inputs = sorted(
        (e["weight"] for e in data["links"] if e["target"] == logit["node_id"]), reverse=True
    )
    listed = panel[panel.index("Input") :]
    positions = [listed.index(f"+{w:.3f}") for w in inputs[:3]]
    assert positions == sorted(positions)
    assert (tmp_path / "viewer.png").stat().st_size > 10_000
