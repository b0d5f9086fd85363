"""The bureau's decryption-key holder: creates the Paillier key pair, decrypts only sums.

The coordinator never holds the private key; it hands the key holder a homomorphic sum and
the number of platforms that contributed to it, and gets plaintext sums back. The key holder
refuses a "sum" of fewer than two contributors (that would be one platform's own figures) or
of more than the slot layout's headroom allows (a sum that could have carried between slots).

What this does not yet protect: a key holder that is handed one platform's ciphertext under
a false contributor count would decrypt it. Additive masks that cancel only in the full sum
(a later issue) remove that: each platform's plaintext is then uniform noise on its own.
"""

from __future__ import annotations

import logging

from protocols.packing import DEBT_PROFILE_LAYOUT, SlotLayout, SlotOverflowError
from protocols.paillier import decrypt_plaintexts, generate_keypair, public_key_to_bytes

log = logging.getLogger(__name__)


class KeyHolderRefusal(PermissionError):
    pass


class KeyHolder:
    def __init__(self, bits: int = 2048, layout: SlotLayout = DEBT_PROFILE_LAYOUT) -> None:
        self.public_key, self._private_key = generate_keypair(bits)
        self.layout = layout
        self.decrypted = 0
        log.info("key holder: new %d-bit Paillier key pair", bits)

    @property
    def public_key_bytes(self) -> bytes:
        return public_key_to_bytes(self.public_key)

    @property
    def key_bits(self) -> int:
        return self.public_key.n.bit_length()

    def decrypt_sums(self, sums: list[int], contributors: int) -> list[int]:
        if contributors < 2:
            raise KeyHolderRefusal(
                f"refusing to decrypt a sum of {contributors} contributor(s): "
                "that would reveal one platform's own figures"
            )
        try:
            self.layout.check_contributors(contributors)
        except SlotOverflowError as exc:
            raise KeyHolderRefusal(f"the sum may overflow its slots: {exc}") from None
        self.decrypted += len(sums)
        return decrypt_plaintexts(self._private_key, sums)
