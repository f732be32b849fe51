"""Errors an outer update raises before it changes any parameter."""


class NonFinite(FloatingPointError):
    """The meta-loss or meta-gradient of a batch is nan or inf; raised before the update, so the
    parameters are still the last finite ones. ``what`` names the quantity."""

    def __init__(self, what: str):
        super().__init__(f"the {what} is not finite (nan or inf)")
        self.what = what
