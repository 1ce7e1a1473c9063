"""Plain-text tables for people (machine formats are JSON and CSV)."""


def columns(header: list, rows: list[list]) -> str:
    """Left-aligned columns two spaces apart, header first."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in [header, *rows])
