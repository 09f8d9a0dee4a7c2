/* libA: as PHP's Imagick (the demo builds it as libimagick_demo.so). It needs libB, linked
 * against it, and creates no key itself. */
int libb_work(int x);

int liba_work(int x) { return libb_work(x) * 2; }
