"""Receiving DICOM: the C-ECHO/C-STORE SCP over pynetdicom (:mod:`.scp`), the store of one
instance that C-STORE and STOW-RS share (:mod:`.instances`), the caller allow-list, TLS,
cheap header and pixel-data checks, and several receiving processes on one port."""
