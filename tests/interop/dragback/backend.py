"""A stand-in for ComfyUI's server, just enough for its frontend to boot and load workflows.

Serves a `comfyui-frontend-package` static folder, the node's web extension the way ComfyUI
serves a custom node's `WEB_DIRECTORY` (under `/extensions/<node folder>/`), and the API routes
the frontend calls while booting, with answers shaped like ComfyUI's (a single user, no models,
an empty queue). Every route is served with and without the `/api` prefix, as ComfyUI does.
Requests the stand-in does not know are answered 404 and listed in the log, so a newer frontend
that needs more shows up there.

Run: `python backend.py --static DIR --extension luna_saver=DIR --object-info FILE --port N`.
"""

from __future__ import annotations

import argparse
import json
import logging
import mimetypes
import sys
from pathlib import Path

from aiohttp import WSMsgType, web

log = logging.getLogger("dragback-backend")

# ComfyUI's answers for a fresh single-user install. The settings mark the first-run tours and
# dialogs as seen, as a user's settings would after the first start.
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Release.Version": "999.0.0",
    "Comfy.Release.Status": "changelog seen",
    "Comfy.Release.Timestamp": 0,
    "Comfy.Validation.Workflows": True,
    "Comfy.Workflow.ShowMissingNodesWarning": False,
    "Comfy.Workflow.ShowMissingModelsWarning": False,
}
SYSTEM_STATS = {
    "system": {
        "os": "posix", "python_version": sys.version.split()[0], "embedded_python": False,
        "comfyui_version": "0.3.60", "pytorch_version": "none", "required_frontend_version": "",
        "argv": ["main.py", "--cpu"], "ram_total": 24 << 30, "ram_free": 20 << 30,
    },
    "devices": [{"name": "cpu", "type": "cpu", "index": None, "vram_total": 0, "vram_free": 0,
                 "torch_vram_total": 0, "torch_vram_free": 0}],
}
STATUS = {"exec_info": {"queue_remaining": 0}}


def build_app(static: Path, extensions: dict, object_info: dict, view_root: Path | None):
    app = web.Application(client_max_size=64 << 20)
    settings = dict(SETTINGS)
    userdata: dict[str, bytes] = {}
    api = web.RouteTableDef()

    def json_ok(value):
        return web.json_response(value)

    @api.get("/users")
    async def users(_):
        return json_ok({"storage": "server", "migrated": True})

    @api.get("/settings")
    async def get_settings(_):
        return json_ok(settings)

    @api.post("/settings")
    async def post_settings(request):
        settings.update(await request.json())
        return json_ok({})

    @api.get("/settings/{id}")
    async def get_setting(request):
        return json_ok(settings.get(request.match_info["id"]))

    @api.post("/settings/{id}")
    async def post_setting(request):
        settings[request.match_info["id"]] = await request.json()
        return json_ok({})

    @api.get("/userdata")
    async def list_userdata(request):
        folder = request.query.get("dir", "").strip("/")
        names = [k[len(folder) + 1:] for k in userdata if k.startswith(folder + "/")]
        return json_ok(names)

    @api.get("/v2/userdata")
    async def list_userdata_v2(_):
        return json_ok([])

    @api.get("/userdata/{file}")
    async def get_userdata(request):
        data = userdata.get(request.match_info["file"])
        if data is None:
            raise web.HTTPNotFound()
        return web.Response(body=data)

    @api.post("/userdata/{file}")
    async def post_userdata(request):
        path = request.match_info["file"]
        userdata[path] = await request.read()
        return json_ok({"path": path, "size": len(userdata[path])})

    @api.delete("/userdata/{file}")
    async def delete_userdata(request):
        userdata.pop(request.match_info["file"], None)
        return web.Response(status=204)

    @api.get("/extensions")
    async def list_extensions(_):
        return json_ok([f"/extensions/{name}/{rel}" for name, (_, files) in extensions.items()
                        for rel in files])

    @api.get("/object_info")
    async def get_object_info(_):
        return json_ok(object_info)

    @api.get("/object_info/{node_class}")
    async def get_one_object_info(request):
        name = request.match_info["node_class"]
        return json_ok({name: object_info[name]} if name in object_info else {})

    @api.get("/system_stats")
    async def system_stats(_):
        return json_ok(SYSTEM_STATS)

    @api.get("/prompt")
    async def get_prompt(_):
        return json_ok(STATUS)

    @api.get("/queue")
    async def queue(_):
        return json_ok({"queue_running": [], "queue_pending": []})

    @api.get("/history")
    async def history(_):
        return json_ok({})

    @api.get("/jobs")
    async def jobs(_):
        return json_ok({"jobs": [], "pagination": {"offset": 0, "limit": 0, "total": 0,
                                                   "has_more": False}})

    def constant(value):
        async def handler(_):
            return json_ok(value)
        return handler

    for empty_list in ("/embeddings", "/models", "/experiment/models", "/node_replacements",
                       "/global_subgraphs"):
        api.get(empty_list)(constant([]))
    for empty_map in ("/i18n", "/features", "/workflow_templates"):
        api.get(empty_map)(constant({}))

    @api.post("/upload/image")
    async def upload_image(request):
        # Newer frontends upload a dropped image that has no workflow, for a LoadImage node.
        form = await request.post()
        image = form.get("image")
        name = getattr(image, "filename", None) or "upload.png"
        return json_ok({"name": name, "subfolder": "", "type": "input"})

    @api.get("/view")
    async def view(request):
        if view_root is None:
            raise web.HTTPNotFound()
        root = view_root.resolve()
        path = (root / request.query.get("subfolder", "") / request.query.get("filename", ""))
        path = path.resolve()
        if root not in path.parents or not path.is_file():
            raise web.HTTPNotFound()
        return web.FileResponse(path)

    async def websocket(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        sid = request.query.get("clientId", "stand-in")
        await ws.send_json({"type": "status", "data": {"status": STATUS, "sid": sid}})
        async for msg in ws:
            if msg.type == WSMsgType.ERROR:
                break
        return ws

    async def templates_index(_):
        return json_ok([])

    async def index(_):
        return web.FileResponse(static / "index.html",
                                headers={"Cache-Control": "no-cache"})

    def extension_file(base: Path):
        async def handler(request):
            path = (base / request.match_info["path"]).resolve()
            if base.resolve() not in path.parents or not path.is_file():
                raise web.HTTPNotFound()
            return web.FileResponse(path, headers={"Content-Type": "application/javascript"})
        return handler

    for route in api:
        app.router.add_route(route.method, "/api" + route.path, route.handler)
        app.router.add_route(route.method, route.path, route.handler)
    app.router.add_get("/ws", websocket)
    app.router.add_get("/templates/index.json", templates_index)
    app.router.add_get("/", index)
    for name, (base, _) in extensions.items():
        app.router.add_get(f"/extensions/{name}/{{path:.+}}", extension_file(base))
    app.router.add_static("/", static)

    @web.middleware
    async def log_misses(request, handler):
        try:
            response = await handler(request)
        except web.HTTPException as e:
            if e.status >= 400:
                log.warning("%d %s %s", e.status, request.method, request.path_qs)
            raise
        if response.status >= 400:
            log.warning("%d %s %s", response.status, request.method, request.path_qs)
        return response

    app.middlewares.append(log_misses)
    return app


def web_files(base: Path) -> list[str]:
    """The `.js` files ComfyUI lists for a `WEB_DIRECTORY`: every one below it, as URL paths."""
    return sorted(p.relative_to(base).as_posix() for p in base.rglob("*.js"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--static", type=Path, required=True,
                        help="comfyui_frontend_package/static of the frontend to serve")
    parser.add_argument("--extension", action="append", default=[], metavar="NAME=DIR",
                        help="a custom node's web directory, served at /extensions/NAME/")
    parser.add_argument("--object-info", type=Path, required=True,
                        help="JSON answer of /object_info (the node definitions)")
    parser.add_argument("--view-root", type=Path, help="folder /view serves files from")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    mimetypes.add_type("application/javascript", ".js")
    mimetypes.add_type("application/javascript", ".mjs")

    extensions = {}
    for spec in args.extension:
        name, _, folder = spec.partition("=")
        base = Path(folder)
        extensions[name] = (base, web_files(base))
    object_info = json.loads(args.object_info.read_text())
    app = build_app(args.static, extensions, object_info, args.view_root)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
