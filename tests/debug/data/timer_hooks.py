"""A hooks file for the record/replay and timeline tests: a periodic timer
every 20 µs of guest time (2,000 guest instructions), taken as #VMEXIT(INTR)."""


def setup(m):
    m.set_timer(20_000)
