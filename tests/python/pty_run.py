"""Runs a command under a pseudo-terminal, as a user at a terminal would (stdin, stdout and
stderr on it, 200 columns, TERM=xterm-256color), and writes everything it printed, escape
sequences included, to OUT. Exits with the command's status.

usage: pty_run.py OUT COMMAND [ARGS...]
"""
import fcntl
import os
import pty
import struct
import sys
import termios


def main() -> int:
    out, cmd = sys.argv[1], sys.argv[2:]
    pid, fd = pty.fork()
    if pid == 0:
        # The child's side of the terminal: a known size before the command asks for it.
        fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        os.environ["TERM"] = "xterm-256color"
        os.execvp(cmd[0], cmd)
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the command closed the terminal (it exited)
            break
        if not data:
            break
        chunks.append(data)
    _, status = os.waitpid(pid, 0)
    with open(out, "wb") as f:
        f.write(b"".join(chunks))
    return os.waitstatus_to_exitcode(status)


if __name__ == "__main__":
    sys.exit(main())
