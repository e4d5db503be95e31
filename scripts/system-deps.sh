#!/bin/sh
# Installs the Debian packages the integration tests and benchmarks talk to (dcmtk, Orthanc and
# its DICOMweb plugin, dicom3tools; chromium for the dashboard's browser test; postgresql for the
# throwaway cluster of the PostgreSQL state-store tests, tests/pg_cluster.py) when they are
# missing and we run as root; otherwise says what will be skipped.
missing=""
command -v storescu >/dev/null 2>&1 || missing="$missing dcmtk"
command -v Orthanc >/dev/null 2>&1 || missing="$missing orthanc"
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing="$missing orthanc-dicomweb"
command -v dciodvfy >/dev/null 2>&1 || missing="$missing dicom3tools"
command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || command -v initdb >/dev/null 2>&1 ||
  missing="$missing postgresql"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian packages:$missing"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq $missing >/dev/null || {
    echo "apt-get failed; integration tests needing$missing will be skipped"; exit 0; }
else
  echo "not root (or no apt-get): missing$missing; the integration tests that need them are skipped"
fi
