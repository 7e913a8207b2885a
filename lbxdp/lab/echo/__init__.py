"""The programs the lab runs inside namespaces, one per module, all started as
`python -m lbxdp.lab.echo [PROGRAM] ...` (see __main__.py):

    (none)   server.py  a backend's echo server: TCP and UDP, IPv4 and IPv6, answers with its name
    client   client.py  counts which backend names answer many TCP connections / UDP datagrams
    hold     hold.py    long-lived TCP connections exchanging numbered lines until told to stop
    http     httpd.py   an HTTP/1.1 health-check target whose status code a test can change

Standard library only, and nothing imported here, so they start fast under any interpreter.
"""
