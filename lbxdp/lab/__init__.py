"""The lab: network namespaces, echo programs and traffic drivers that `lbxdp demo`, `lbxdp rig`,
tests/netns and scripts/ use to exercise lbxdp with real packets. None of it is the product: the
product package imports the lab only from the demo and rig commands.

    shapes.py      what to build: RigSpec, Shape (l2, nat, routed, multi) and the Layout of a shape
                   (hosts, segments, addresses, routes, sysctls), pure values without netlink
    namespaces.py  running code and commands inside a namespace (setns per thread, nsenter)
    topology.py    builds and removes a Layout with pyroute2: the one place that wraps it
    processes.py   servers started in namespaces: PIDs with start times, PR_SET_PDEATHSIG, logs
    traffic.py     client drivers: ping, tcp hello, echo clients, held connections
    stub.py        the XDP_PASS stub on a veth peer that native-mode XDP_TX needs
    configs.py     lbxdp configs for a rig, built as model values and written by config.dump
    rig.py         Rig: the facade tests and commands use (up, down, state, names)
    echo/          the programs run inside the namespaces (`python -m lbxdp.lab.echo ...`)

Kept light on purpose: importing lbxdp.lab (as `python -m lbxdp.lab.echo` does) imports nothing.
"""
