__all__ = ["COORDINATE_LEN", "ENGINE", "ExchangeKey", "add_points"]

from typing import Final, final

COORDINATE_LEN: Final[int]
ENGINE: Final[str]

@final
class ExchangeKey:
    """A P-521 exchange (ECMR) private key held in Rust; the scalar cannot be read back."""

    def __new__(cls, d: bytes, x: bytes, y: bytes) -> ExchangeKey: ...
    def exchange(self, x: bytes, y: bytes) -> tuple[bytes, bytes]: ...

def add_points(x1: bytes, y1: bytes, x2: bytes, y2: bytes) -> tuple[bytes, bytes]: ...
