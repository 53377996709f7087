"""Lines tests add to the end of the pytest output (conftest.pytest_terminal_summary prints them)."""

LINES: list[str] = []
