"""mDNS across hosts: three network namespaces on a bridge, one node in each, form one mesh."""

from __future__ import annotations

import json
import secrets
import subprocess
import sys

from tests.mesh_harness import NodeProc, wait_until
from tests.netns import bridged_hosts


def test_three_hosts_on_a_bridge_discover_each_other_and_form_one_mesh() -> None:
    mesh = f"t-netns-{secrets.token_hex(3)}"
    with bridged_hosts(3) as hosts:
        procs = [NodeProc(mesh, f"h{i}", interface=addr, netns=ns) for i, (ns, addr) in enumerate(hosts)]
        try:
            for p in procs:
                p.wait_started()
            ns0, addr0 = hosts[0]

            def status() -> dict:
                out = subprocess.run(["ip", "netns", "exec", ns0, sys.executable, "-m", "meshllm", "status",
                                      "--mesh", mesh, "--json", "--interface", addr0],
                                     capture_output=True, text=True, timeout=60)
                assert out.returncode == 0, out.stderr
                return json.loads(out.stdout)

            st = wait_until(lambda: (s := status()) and len(s["members"]) == 3 and s["planner"] and s, 45,
                            "three hosts in one mesh")
            assert sorted(st["members"]) == ["h0", "h1", "h2"]
            # each node advertised its own namespace address, and the broker lives on one of them
            assert sorted(m["host"] for m in st["members"].values()) == sorted(a for _, a in hosts)
            broker_host = st["broker"].split("//", 1)[1].rsplit(":", 1)[0]
            assert broker_host in {a for _, a in hosts}
        finally:
            for p in procs:
                p.kill()
