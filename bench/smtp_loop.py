"""The delivery baseline: send mails kept in a pickle file over one reused smtplib connection.

Run as its own process so that it does not share the sink's interpreter lock. Prints the seconds taken.

    python bench/smtp_loop.py HOST PORT FILE
"""

import pickle
import smtplib
import sys
import time


def main(host, port, path):
    with open(path, "rb") as handle:
        mails = pickle.load(handle)
    start = time.perf_counter()
    with smtplib.SMTP(host, int(port), timeout=30) as smtp:
        for mail_from, rcpt_tos, content in mails:
            smtp.sendmail(mail_from, rcpt_tos, content)
    print(time.perf_counter() - start)


if __name__ == "__main__":
    main(*sys.argv[1:])
