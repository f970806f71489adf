# shellcheck shell=bash
# A real OCI registry for the registry tests (hpcexp push / pull / signed images / bases
# from a site registry), with TLS as sites run it.
#
#  - docker-registry (Debian's build of the distribution registry): each test starts its
#    own instance on 127.0.0.1 with a random port and temporary storage and stops it; the
#    packaged system service is stopped and disabled here, nothing listens after this.
#  - umoci + skopeo: the tests build a tiny OCI base image and copy it into the registry.
#  - A test CA, trusted through the system CA store (update-ca-certificates), and one
#    server certificate for 127.0.0.1/localhost signed by it. The CA key is deleted right
#    after signing, so nothing else can ever be issued under this CA. The server key is
#    readable by the test user only (it starts the registry itself).

need_pkgs docker-registry umoci skopeo openssl ca-certificates

if systemctl is-enabled docker-registry >/dev/null 2>&1 || systemctl is-active docker-registry >/dev/null 2>&1; then
    log "stopping the packaged docker-registry service (tests start their own on 127.0.0.1)"
    systemctl disable --now docker-registry >/dev/null 2>&1 || true
fi

REG_TLS_DIR=/etc/hpcexp-test-registry
REG_CA_SYS=/usr/local/share/ca-certificates/hpcexp-test-registry-ca.crt
if [ ! -s "$REG_TLS_DIR/server.crt" ] || [ ! -s "$REG_TLS_DIR/server.key" ] || [ ! -s "$REG_CA_SYS" ]; then
    log "creating a loopback-only test CA and registry certificate in $REG_TLS_DIR"
    install -d -m 0755 "$REG_TLS_DIR"
    reg_work="$(mktemp -d)"
    openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=hpcexp test registry CA" \
        -addext "basicConstraints=critical,CA:TRUE,pathlen:0" -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -addext "nameConstraints=critical,permitted;IP:127.0.0.0/255.0.0.0,permitted;DNS:localhost" \
        -keyout "$reg_work/ca.key" -out "$reg_work/ca.crt" 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=127.0.0.1" -keyout "$reg_work/server.key" \
        -out "$reg_work/server.csr" 2>/dev/null
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n' \
        > "$reg_work/ext.cnf"
    openssl x509 -req -in "$reg_work/server.csr" -CA "$reg_work/ca.crt" -CAkey "$reg_work/ca.key" \
        -CAcreateserial -days 3650 -extfile "$reg_work/ext.cnf" -out "$reg_work/server.crt" 2>/dev/null
    install -m 0644 "$reg_work/ca.crt" "$REG_TLS_DIR/ca.crt"
    install -m 0644 "$reg_work/server.crt" "$REG_TLS_DIR/server.crt"
    install -m 0640 -g "$TEST_USER" "$reg_work/server.key" "$REG_TLS_DIR/server.key"
    install -m 0644 "$reg_work/ca.crt" "$REG_CA_SYS"
    rm -rf "$reg_work"   # the CA key goes: nothing else can be signed under this CA
    update-ca-certificates >/dev/null
fi
chgrp "$TEST_USER" "$REG_TLS_DIR/server.key" && chmod 0640 "$REG_TLS_DIR/server.key"
log "registry: docker-registry $(dpkg-query -W -f='${Version}' docker-registry), TLS for 127.0.0.1 from $REG_TLS_DIR"
