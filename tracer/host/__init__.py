"""The machine as /proc and ELF files show it: processes (proc), ELF files (elf), C libraries and
their rules (libc), and live pthread key tables (keytable)."""
