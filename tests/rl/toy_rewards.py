"""A reward with signal for a random tiny model (tests only): 1 if the response contains a digit."""


def has_digit(response: str, gold: str) -> float:
    return 1.0 if any(c.isdigit() for c in response) else 0.0


def constant(response: str, gold: str) -> float:
    """Every response gets 1: no prompt group ever has reward variance."""
    return 1.0
