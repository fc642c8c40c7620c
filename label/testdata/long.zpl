^XA
^FXprovision label P1^FS
^CI28
^PW406
^LL203
^LH0,0
^FO16,10^BQN,2,3^FH_^FDMA,P1/ACME_5FGW_5E2026_7Exxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx/3f7a1c9e5b2d4f6081a3c5e7092b4d6f8a1c3e5f7092b4d6f8a1c3e5f7092b4d^FS
^FO199,12^A0N,20,20^FB199,1,0,L,0^FDGateway 3000^FS
^FO199,38^A0N,16,16^FB199,4,0,L,0^FH_^FDACME_5FGW_5E2026_7Exxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx^FS
^FO199,118^A0N,24,24^FD2026-12-02^FS
^FO199,148^A0N,18,18^FDcert 3f7a1c9e5b2d^FS
^PQ1
^XZ
