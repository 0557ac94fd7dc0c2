"""A real Orthanc (Debian's /usr/sbin/Orthanc) on loopback for tests, with the DICOMweb plugin.

Helpers only; fixtures wrap them.  ``free_port()`` picks a loopback port; ``Orthanc.start``
writes a JSON config into a folder, starts the server and waits until its REST API answers.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peers import ORTHANC_PLUGINS, require

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = ORTHANC_PLUGINS / "libOrthancDicomWeb.so"


def have_orthanc() -> bool:
    """Whether Orthanc is installed.  Tests mark ``needs("orthanc")`` instead of skipping on this:
    under CI a missing Orthanc must fail (tests/peers.py)."""
    return Path(ORTHANC).is_file()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Orthanc:
    folder: Path
    dicom_port: int
    http_port: int
    ae_title: str = "ORTHANC"
    #: Further Orthanc configuration merged over the defaults below (Lua scripts, modalities,
    #: ServeFolders, ...). "Plugins" lists are added to the DICOMweb plugin, not replacing it.
    extra: dict[str, Any] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self, timeout: float = 30.0) -> "Orthanc":
        require("orthanc")
        storage = self.folder / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "Name": "glio-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "ConcurrentJobs": 1,
            "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.is_file() else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        for key, value in self.extra.items():
            if key == "Plugins":
                config["Plugins"] = [*config["Plugins"], *value]
            else:
                config[key] = value
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        log = (self.folder / "orthanc.log").open("ab")
        self.process = subprocess.Popen([ORTHANC, str(path)], stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.process.returncode}; see {self.folder}/orthanc.log")
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not answer within {timeout} s; see {self.folder}/orthanc.log")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def auth_headers(self) -> dict[str, str]:
        """Basic auth as the first of ``RegisteredUsers`` when ``extra`` turns authentication on
        (so the helpers below, and tests, can talk to a protected Orthanc)."""
        users = self.extra.get("RegisteredUsers") if self.extra.get("AuthenticationEnabled") else None
        if not users:
            return {}
        user, password = next(iter(users.items()))
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}

    def get(self, path: str) -> Any:
        request = urllib.request.Request(self.url + path, headers=self.auth_headers())
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())

    def post(self, path: str, body: Any) -> Any:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json", **self.auth_headers()},
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())

    def instances_of_study(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """Every instance Orthanc holds in the study: MainDicomTags, ParentSeries."""
        return self.post(
            "/tools/find",
            {"Level": "Instance", "Query": {"StudyInstanceUID": study_instance_uid}, "Expand": True},
        )

    def series_of_study(self, study_instance_uid: str) -> list[dict[str, Any]]:
        return self.post(
            "/tools/find",
            {"Level": "Series", "Query": {"StudyInstanceUID": study_instance_uid}, "Expand": True},
        )

    def instance_count(self) -> int:
        return int(self.get("/statistics")["CountInstances"])
