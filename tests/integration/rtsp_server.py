"""A real RTSP server for the tests: GStreamer's (gst-rtsp-server) through its Python bindings, which Debian
packages for its own Python only, so the tests run this file with /usr/bin/python3 (see test_rtsp.py).

    /usr/bin/python3 rtsp_server.py PORT AUDIO_FILE USER PASSWORD

Serves AUDIO_FILE as Opus at rtsp://USER:PASSWORD@127.0.0.1:PORT/opus and as AAC at .../aac, each client from
the start of the file (which ends: the client sees the stream end). Prints "ready" once listening.
"""

import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

Gst.init(None)
port, path, user, password = sys.argv[1:5]
server = GstRtspServer.RTSPServer()
server.set_service(port)
server.set_address("127.0.0.1")
auth = GstRtspServer.RTSPAuth()
token = GstRtspServer.RTSPToken()
token.set_string("media.factory.role", "user")
auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password), token)
server.set_auth(auth)
permissions = GstRtspServer.RTSPPermissions()
permissions.add_permission_for_role("user", "media.factory.access", True)
permissions.add_permission_for_role("user", "media.factory.construct", True)
for mount, encode in (
    ("/opus", "opusenc ! rtpopuspay name=pay0 pt=96"),
    ("/aac", "avenc_aac ! rtpmp4gpay name=pay0 pt=97"),
):
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(
        f"( filesrc location={path} ! decodebin ! audioconvert ! audioresample ! audio/x-raw,rate=48000 ! {encode} )"
    )
    factory.set_shared(False)
    factory.set_permissions(permissions)
    server.get_mount_points().add_factory(mount, factory)
if server.attach(None) == 0:
    sys.exit(f"cannot listen on port {port}")
print("ready", flush=True)
GLib.MainLoop().run()
