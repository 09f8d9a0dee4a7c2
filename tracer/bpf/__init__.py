"""The kernel side: loading probe units (loader), reading their ring buffer (ringbuf), the kernel
headers bcc compiles against (headers), and the prerequisite checks (doctor)."""
