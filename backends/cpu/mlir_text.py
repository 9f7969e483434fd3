"""SSA text builder shared by the CPU kernel generators (kernels.py, int_kernels.py)."""


class MlirText:
    """`v(expr)` appends `%tN = expr` and returns `%tN`; `open`/`close` nest regions."""

    def __init__(self, indent: int = 2):
        self.lines = []
        self.n = 0
        self.indent = indent

    def v(self, expr: str) -> str:
        self.n += 1
        self.lines.append(" " * self.indent + f"%t{self.n} = {expr}")
        return f"%t{self.n}"

    def vs(self, count: int, expr: str) -> list[str]:
        self.n += 1
        self.lines.append(" " * self.indent + f"%t{self.n}:{count} = {expr}")
        return [f"%t{self.n}#{i}" for i in range(count)]

    def op(self, text: str) -> None:
        self.lines.append(" " * self.indent + text)

    def open(self, text: str) -> None:
        self.op(text)
        self.indent += 2

    def close(self, text: str = "}") -> None:
        self.indent -= 2
        self.op(text)

    def idx(self, value: int) -> str:
        return self.v(f"arith.constant {value} : index")

    def text(self) -> str:
        return "\n".join(self.lines)
