//+------------------------------------------------------------------+
//| DynamicCoreEA.mq5                                                  |
//|                                                                    |
//| The MetaTrader 5 side of the dynamic_core bridge, protocol         |
//| version 1 (docs/mt5-bridge.md). It behaves as the reference EA,    |
//| dynamic_core.bridges.mt5.SimulatedTerminal, does:                  |
//|  - one ZeroMQ DEALER connected to the engine's ROUTER, one JSON    |
//|    object per single-frame message, polled without blocking from   |
//|    OnTimer (every InpTimerMs) and OnTick, draining what waits;     |
//|  - hello (epoch, login, server, resumed) until the engine answers, |
//|    then heartbeats both ways; sequence numbers per direction;      |
//|    messages of unknown or retired engine epochs are not acted on;  |
//|  - every order acked before it is sent to the trade server, and    |
//|    de-duplicated by client_order_id: a table persisted under       |
//|    MQL5/Files plus a search of the terminal's orders, positions    |
//|    and history by comment, so a repeated order, or one that an     |
//|    earlier EA instance placed, is never placed again; its first    |
//|    ack and current exec_report are repeated instead;               |
//|  - orders at or after valid_until refused (expired); market, limit |
//|    and stop orders with sl/tp through CTrade; cumulative exec      |
//|    reports; cancel; positions_query and flatten answered with      |
//|    position messages and positions_end; error for bad frames.      |
//+------------------------------------------------------------------+
#property copyright "dynamic_core"
#property version   "1.00"
#property description "dynamic_core MT5 bridge EA: protocol v1 over a ZeroMQ DEALER (needs mql-zmq and DLL imports)"

#include <Zmq/Zmq.mqh>
#include <DynamicCore/Protocol.mqh>
#include <DynamicCore/Session.mqh>
#include <DynamicCore/Trading.mqh>

#define DC_EA_BUILD     "DynamicCoreEA 1.0"
#define DC_OUTBOX_MAX   4096
#define DC_RETIRED_MAX  64

//--- inputs
input string InpEndpoint            = "tcp://127.0.0.1:5560"; // Engine address (dynamic-core bridge mt5 --bind)
input int    InpHeartbeatMs         = 1000;   // Hello/heartbeat interval until the engine's hello says otherwise (ms)
input int    InpTimerMs             = 10;     // Socket poll period (ms)
input long   InpMagic               = 556001; // Magic of the bridge's orders (engine --magic): rebuild, engine-loss flatten
input int    InpDeviationPoints     = 10;     // Market order deviation (points)
input bool   InpFlattenOnEngineLoss = false;  // Flatten when the engine is silent for its `missed` heartbeats
input int    InpHistoryDays         = 7;      // Days of history searched for orders by comment
input int    InpMaxOrders           = 20000;  // Orders remembered for de-duplication
input int    InpRefreshMs           = 500;    // How often resting orders are followed (ms)
input string InpStateFile           = "";     // Order table file under MQL5/Files ("": DynamicCore\orders_<login>_<magic>.txt)
input int    InpMaxMessagesPerPoll  = 1000;   // Frames handled per timer or tick event
input bool   InpVerbose             = false;  // Log every message

//--- transport
Context          *g_ctx=NULL;
Socket           *g_sock=NULL;
uchar             g_rx[];
CDcJson           g_json;
DcEngineMessage   g_msg;
//--- session
CDcClock          g_clock;
long              g_epoch=0;
long              g_out_seq=0;
long              g_engine_epoch=0;
bool              g_handshaked=false;
bool              g_had_session=false;
long              g_retired[DC_RETIRED_MAX];
int               g_retired_n=0;
CDcSeqTracker     g_in;
long              g_hb_ms=1000;
long              g_missed=3;
long              g_engine_magic=0;
ulong             g_last_heard_us=0;
bool              g_engine_lost=false;
ulong             g_next_hello_us=0;
ulong             g_next_hb_us=0;
ulong             g_next_refresh_us=0;
bool              g_dirty=false;
string            g_outbox[];
int               g_outbox_n=0;
//--- orders
CDcOrderTable     g_table;
CDcBroker         g_broker;
//--- counters
long              g_cnt_orders=0,g_cnt_duplicates=0,g_cnt_expired=0,g_cnt_submits=0,g_cnt_cancels=0;
long              g_cnt_queries=0,g_cnt_flattens=0,g_cnt_hellos=0,g_cnt_heartbeats=0,g_cnt_errors_sent=0;
long              g_cnt_errors_received=0,g_cnt_stale=0,g_cnt_unknown_epoch=0,g_cnt_engine_losses=0;
long              g_cnt_send_failures=0,g_cnt_rejects=0;

//+------------------------------------------------------------------+
//| Sending                                                            |
//+------------------------------------------------------------------+
void NextStamp(DcStamp &s)
  {
   g_out_seq++;
   s.epoch=g_epoch;
   s.seq=g_out_seq;
   s.ts=g_clock.Now();
  }
//+------------------------------------------------------------------+
//| One frame, never blocking: a full queue drops it (the engine's     |
//| re-sends recover whatever matters)                                 |
//+------------------------------------------------------------------+
bool SendFrame(const string json)
  {
   if(g_sock==NULL)
      return(false);
   uchar buf[];
   int n=StringToCharArray(json,buf,0,StringLen(json),CP_UTF8);   // the writer emits ASCII only
   ArrayResize(buf,MathMax(n,0));
   if(InpVerbose)
      Print("DynamicCoreEA >> ",json);
   if(!g_sock.send(buf,true))
     {
      g_cnt_send_failures++;
      if(InpVerbose)
         PrintFormat("DynamicCoreEA: send failed: %s",Zmq::errorMessage(Zmq::errorNumber()));
      return(false);
     }
   return(true);
  }
//+------------------------------------------------------------------+
void SendHello(void)
  {
   DcStamp s;
   NextStamp(s);
   g_cnt_hellos++;
   string build=DC_EA_BUILD+" (MT5 build "+IntegerToString(TerminalInfoInteger(TERMINAL_BUILD))+")";
   SendFrame(DcWriteTerminalHello(s,AccountInfoInteger(ACCOUNT_LOGIN),AccountInfoString(ACCOUNT_SERVER),
                                  g_had_session,g_engine_epoch,build));
  }
//+------------------------------------------------------------------+
void SendHeartbeat(void)
  {
   DcStamp s;
   NextStamp(s);
   g_cnt_heartbeats++;
   SendFrame(DcWriteHeartbeat(s,g_in.Highest()));
  }
//+------------------------------------------------------------------+
void SendError(const string reason,const string detail,const long ref_seq)
  {
   DcStamp s;
   NextStamp(s);
   g_cnt_errors_sent++;
   SendFrame(DcWriteError(s,reason,DcClip(detail,200),ref_seq));
  }
//+------------------------------------------------------------------+
void SendAck(const CDcOrderRec *rec,const long order_seq,const bool duplicate)
  {
   DcStamp s;
   NextStamp(s);
   SendFrame(DcWriteAck(s,rec.coid,order_seq,rec.accepted,rec.ack_reason,duplicate,rec.ticket));
  }
//+------------------------------------------------------------------+
//| The order's current state (cumulative); nothing while its outcome  |
//| is not known yet                                                   |
//+------------------------------------------------------------------+
void SendReport(const CDcOrderRec *rec)
  {
   if(rec.status=="")
      return;
   DcStamp s;
   NextStamp(s);
   SendFrame(DcWriteExecReport(s,rec.coid,rec.status,rec.symbol,rec.side,rec.ticket,rec.price,rec.filled,
                               rec.commission,rec.fill_ts,rec.reason));
  }
//+------------------------------------------------------------------+
//| A report decided outside the handling of an engine message: sent   |
//| once the engine knows this EA (bounded; the engine's status        |
//| requests recover anything dropped)                                 |
//+------------------------------------------------------------------+
void QueueReport(const string coid)
  {
   if(g_outbox_n>=DC_OUTBOX_MAX)
     {
      for(int i=1; i<g_outbox_n; i++)
         g_outbox[i-1]=g_outbox[i];
      g_outbox_n--;
     }
   if(ArraySize(g_outbox)<=g_outbox_n)
      ArrayResize(g_outbox,g_outbox_n+64);
   g_outbox[g_outbox_n++]=coid;
  }
//+------------------------------------------------------------------+
void FlushOutbox(void)
  {
   for(int i=0; i<g_outbox_n; i++)
     {
      CDcOrderRec *rec=g_table.Find(g_outbox[i]);
      if(rec!=NULL)
         SendReport(rec);
     }
   g_outbox_n=0;
  }
//+------------------------------------------------------------------+
void AnswerPositions(const long query_id,const long magic)
  {
   DcPositionInfo list[];
   long snapshot=0;
   int n=g_broker.Positions(magic,g_table,list,snapshot);
   DcStamp s;
   for(int i=0; i<n; i++)
     {
      NextStamp(s);
      SendFrame(DcWritePosition(s,query_id,snapshot,i+1,list[i]));
     }
   NextStamp(s);
   SendFrame(DcWritePositionsEnd(s,query_id,snapshot,n));
  }
//+------------------------------------------------------------------+
//| Engine epochs                                                      |
//+------------------------------------------------------------------+
bool IsRetired(const long epoch)
  {
   int n=MathMin(g_retired_n,DC_RETIRED_MAX);
   for(int i=0; i<n; i++)
      if(g_retired[i]==epoch)
         return(true);
   return(false);
  }
//+------------------------------------------------------------------+
void Retire(const long epoch)
  {
   g_retired[g_retired_n%DC_RETIRED_MAX]=epoch;
   g_retired_n++;
  }
//+------------------------------------------------------------------+
//| The EA rules (docs/mt5-bridge.md, section 5)                       |
//+------------------------------------------------------------------+
void OnOrderMessage(const DcHeader &h,const DcOrder &o)
  {
   g_cnt_orders++;
   CDcOrderRec *rec=g_table.Find(o.client_order_id);
   if(rec!=NULL)
     {
      //--- seen before: repeat the first decision and the current state, place nothing
      g_cnt_duplicates++;
      SendAck(rec,h.seq,true);
      SendReport(rec);
      return;
     }
   long now=g_clock.Now();
   rec=g_table.Create(o.client_order_id,now);
   if(rec==NULL)
     {
      //--- the table holds only open orders: refuse without remembering (a re-send may pass later)
      DcStamp s;
      NextStamp(s);
      SendFrame(DcWriteAck(s,o.client_order_id,h.seq,false,"busy",false,0));
      return;
     }
   rec.symbol=o.symbol;
   rec.side=o.side;
   rec.order_type=o.order_type;
   rec.volume=o.volume;
   rec.valid_until=o.valid_until;
   rec.magic=o.magic;
   if(o.comment!="" && o.comment!=o.client_order_id)
      PrintFormat("DynamicCoreEA: %s: comment '%s' ignored: the MT5 comment is the client_order_id",
                  o.client_order_id,o.comment);
   if(now>=o.valid_until)
     {
      g_cnt_expired++;
      rec.accepted=false;
      rec.ack_reason="expired";
      rec.status="expired";
      rec.reason="expired";
      g_table.Save(rec);
      SendAck(rec,h.seq,false);
      SendReport(rec);
      return;
     }
   //--- placed by an earlier instance of this EA (its table lost or behind)? never twice
   if(g_broker.Lookup(o.client_order_id,rec))
     {
      g_cnt_duplicates++;
      PrintFormat("DynamicCoreEA: %s found in the terminal (ticket %I64d, %s): not placed again",
                  rec.coid,rec.ticket,rec.status);
      g_table.Save(rec);
      SendAck(rec,h.seq,true);
      SendReport(rec);
      return;
     }
   string refusal=g_broker.Check(o);
   if(refusal!="")
     {
      rec.accepted=false;
      rec.ack_reason=refusal;
      rec.status="rejected";
      rec.reason=refusal;
      g_table.Save(rec);
      SendAck(rec,h.seq,false);
      SendReport(rec);
      return;
     }
   //--- record, ack, place, record the outcome, report
   rec.accepted=true;
   g_table.Save(rec);
   SendAck(rec,h.seq,false);
   g_cnt_submits++;
   g_broker.Place(rec,o,now);
   g_table.Save(rec);
   SendReport(rec);
   if(rec.status=="placed" || rec.status=="partial")
      g_dirty=true;
  }
//+------------------------------------------------------------------+
void OnCancelMessage(const DcCancel &c)
  {
   g_cnt_cancels++;
   long now=g_clock.Now();
   CDcOrderRec *rec=g_table.Find(c.client_order_id);
   if(rec==NULL)
     {
      //--- a tombstone: the order, should it arrive later, is refused
      rec=g_table.Create(c.client_order_id,now);
      if(rec==NULL)
         return;
      rec.accepted=false;
      rec.ack_reason="cancelled";
      rec.status="cancelled";
      rec.reason="cancelled";
      g_table.Save(rec);
     }
   else
      if(rec.status=="placed" || rec.status=="partial")
        {
         if(g_broker.Cancel(rec,(c.reason!="") ? c.reason : "cancelled",now))
            g_table.Save(rec);
        }
   SendReport(rec);
  }
//+------------------------------------------------------------------+
//| Delete the bridge's resting orders (reported cancelled, reason     |
//| flatten), then every pending order and position of magic           |
//+------------------------------------------------------------------+
void DoFlatten(const long magic)
  {
   long now=g_clock.Now();
   int n=g_table.Count();
   for(int i=0; i<n; i++)
     {
      CDcOrderRec *rec=g_table.At(i);
      if(rec==NULL || (rec.status!="placed" && rec.status!="partial"))
         continue;
      if(magic!=0 && rec.magic!=magic)
         continue;
      if(g_broker.Cancel(rec,"flatten",now))
        {
         g_table.Save(rec);
         QueueReport(rec.coid);
        }
     }
   int acted=g_broker.Flatten(magic);
   PrintFormat("DynamicCoreEA: flatten (magic %I64d): %d orders/positions closed or deleted",magic,acted);
  }
//+------------------------------------------------------------------+
//| Follow resting orders: fills, broker expiry, cancellations         |
//+------------------------------------------------------------------+
void RefreshOpenOrders(void)
  {
   long now=g_clock.Now();
   int n=g_table.Count();
   for(int i=0; i<n; i++)
     {
      CDcOrderRec *rec=g_table.At(i);
      if(rec==NULL || (rec.status!="placed" && rec.status!="partial"))
         continue;
      if(g_broker.Refresh(rec,now))
        {
         g_table.Save(rec);
         QueueReport(rec.coid);
        }
     }
  }
//+------------------------------------------------------------------+
//| One decoded engine message (mirrors SimulatedTerminal._dispatch)   |
//+------------------------------------------------------------------+
void Dispatch(DcEngineMessage &m)
  {
   long ep=m.h.epoch;
   if(IsRetired(ep))
     {
      g_cnt_stale++;
      return;
     }
   if(m.type==DC_MSG_HELLO)
     {
      if(m.hello.peer_epoch!=g_epoch)
        {
         SendHello();   // the engine does not know this EA (yet)
         return;
        }
      if(ep!=g_engine_epoch)
        {
         if(g_engine_epoch!=0)
            Retire(g_engine_epoch);
         PrintFormat("DynamicCoreEA: engine session %I64d (heartbeat %I64d ms, missed %I64d, magic %I64d)",
                     ep,m.hello.heartbeat_ms,m.hello.missed,m.hello.magic);
         g_engine_epoch=ep;
         g_in.Reset();
         g_in.Check(m.h.seq);
        }
      g_handshaked=true;
      g_had_session=true;
      g_hb_ms=m.hello.heartbeat_ms;
      g_missed=m.hello.missed;
      g_engine_magic=m.hello.magic;
      g_last_heard_us=GetMicrosecondCount();
      g_engine_lost=false;
      return;
     }
   if(!g_handshaked || ep!=g_engine_epoch)
     {
      g_cnt_unknown_epoch++;
      if(g_handshaked)
        {
         //--- the engine restarted: introduce this EA to it (resumed)
         PrintFormat("DynamicCoreEA: message from unknown engine epoch %I64d: saying hello",ep);
         g_handshaked=false;
         g_next_hello_us=0;
        }
      return;
     }
   if(g_in.Check(m.h.seq)==DC_SEQ_DUPLICATE)
      return;
   g_last_heard_us=GetMicrosecondCount();
   g_engine_lost=false;
   if(m.type==DC_MSG_ORDER)
      OnOrderMessage(m.h,m.order);
   else
      if(m.type==DC_MSG_CANCEL)
         OnCancelMessage(m.cancel);
      else
         if(m.type==DC_MSG_POSITIONS_QUERY)
           {
            g_cnt_queries++;
            AnswerPositions(m.query.query_id,m.query.magic);
           }
         else
            if(m.type==DC_MSG_FLATTEN)
              {
               g_cnt_flattens++;
               DoFlatten(m.flatten.magic);
               FlushOutbox();
               AnswerPositions(m.flatten.query_id,m.flatten.magic);
              }
            else
               if(m.type==DC_MSG_ERROR)
                 {
                  g_cnt_errors_received++;
                  PrintFormat("DynamicCoreEA: the engine reported an error: %s %s (seq %I64d)",
                              m.error.reason,m.error.detail,m.error.ref_seq);
                 }
   //--- DC_MSG_HEARTBEAT: a sign of life, nothing else
  }
//+------------------------------------------------------------------+
//| One frame from the engine                                          |
//+------------------------------------------------------------------+
void HandleFrame(const int len)
  {
   if(InpVerbose)
      Print("DynamicCoreEA << ",CharArrayToString(g_rx,0,MathMin(len,2048),CP_UTF8));
   string reason="",detail="";
   long ref_seq=0;
   bool is_error=false;
   if(!DcDecode(g_json,g_rx,len,g_msg,reason,detail,ref_seq,is_error))
     {
      g_cnt_rejects++;
      PrintFormat("DynamicCoreEA: refused a frame from the engine: %s: %s",reason,detail);
      if(!is_error)   // an error is never answered with an error
         SendError(reason,detail,ref_seq);
      return;
     }
   Dispatch(g_msg);
  }
//+------------------------------------------------------------------+
//| Drain the socket without blocking                                  |
//+------------------------------------------------------------------+
void Poll(void)
  {
   if(g_sock==NULL)
      return;
   for(int k=0; k<InpMaxMessagesPerPoll; k++)
     {
      ZmqMsg msg;
      if(!g_sock.recv(msg,true))
         break;   // nothing waiting (EAGAIN)
      long size=(long)msg.size();
      int frames=1;
      bool more=msg.more();
      while(more && frames<1000)
        {
         ZmqMsg part;
         if(!g_sock.recv(part,true))
            break;
         frames++;
         more=part.more();
        }
      if(frames!=1)
        {
         g_cnt_rejects++;
         SendError("invalid","expected 1 frame, got "+IntegerToString(frames),0);
         continue;
        }
      if(size>DC_MAX_FRAME)
        {
         g_cnt_rejects++;
         SendError("oversized",IntegerToString(size)+" bytes > max_frame "+IntegerToString(DC_MAX_FRAME),0);
         continue;
        }
      ArrayResize(g_rx,(int)size);
      if(size>0)
         msg.getData(g_rx);
      HandleFrame((int)size);
     }
  }
//+------------------------------------------------------------------+
//| Hello until the handshake, heartbeats after it, engine liveness    |
//+------------------------------------------------------------------+
void Housekeeping(void)
  {
   ulong now=GetMicrosecondCount();
   ulong interval=(ulong)((g_hb_ms>1) ? g_hb_ms : 1)*1000;
   if(!g_handshaked)
     {
      if(now>=g_next_hello_us)
        {
         SendHello();
         g_next_hello_us=now+interval;
        }
     }
   else
     {
      FlushOutbox();
      if(now>=g_next_hb_us)
        {
         SendHeartbeat();
         g_next_hb_us=now+interval;
        }
      if(!g_engine_lost && now-g_last_heard_us>(ulong)g_missed*interval)
        {
         g_engine_lost=true;
         g_cnt_engine_losses++;
         PrintFormat("DynamicCoreEA: engine %I64d silent for %I64d heartbeats",g_engine_epoch,g_missed);
         if(InpFlattenOnEngineLoss)
            DoFlatten((g_engine_magic!=0) ? g_engine_magic : InpMagic);
        }
     }
   if(g_dirty || now>=g_next_refresh_us)
     {
      g_dirty=false;
      g_next_refresh_us=now+(ulong)MathMax(InpRefreshMs,10)*1000;
      RefreshOpenOrders();
     }
  }
//+------------------------------------------------------------------+
//| After a restart: orders accepted whose outcome was never recorded  |
//| (the EA stopped between the ack and OrderSend's result) are looked |
//| up by comment; absent means not executed: rejected, never placed   |
//| now (docs section 5)                                               |
//+------------------------------------------------------------------+
void ResolveUnknownOutcomes(void)
  {
   long now=g_clock.Now();
   int n=g_table.Count();
   for(int i=0; i<n; i++)
     {
      CDcOrderRec *rec=g_table.At(i);
      if(rec==NULL)
         continue;
      if(rec.status=="")
        {
         if(!g_broker.Lookup(rec.coid,rec))
           {
            rec.status="rejected";
            rec.reason="terminal_restart";
           }
         PrintFormat("DynamicCoreEA: %s: outcome after restart: %s %s",rec.coid,rec.status,rec.reason);
         g_table.Save(rec);
        }
      else
         if((rec.status=="placed" || rec.status=="partial") && g_broker.Refresh(rec,now))
            g_table.Save(rec);
     }
  }
//+------------------------------------------------------------------+
void CloseSocket(void)
  {
   if(g_sock!=NULL)
     {
      delete g_sock;
      g_sock=NULL;
     }
   if(g_ctx!=NULL)
     {
      delete g_ctx;
      g_ctx=NULL;
     }
  }
//+------------------------------------------------------------------+
int OnInit(void)
  {
   if(!MQLInfoInteger(MQL_DLLS_ALLOWED))
     {
      Print("DynamicCoreEA: allow DLL imports (libzmq.dll) in the EA's settings");
      return(INIT_FAILED);
     }
   if(InpHeartbeatMs<10 || InpTimerMs<1 || InpTimerMs>1000 || InpMaxOrders<100 || InpMaxMessagesPerPoll<1 ||
      InpHistoryDays<1 || InpMagic<0)
     {
      Print("DynamicCoreEA: need InpHeartbeatMs >= 10, 1 <= InpTimerMs <= 1000, InpMaxOrders >= 100, ",
            "InpMaxMessagesPerPoll >= 1, InpHistoryDays >= 1, InpMagic >= 0");
      return(INIT_PARAMETERS_INCORRECT);
     }
   MathSrand((uint)(GetMicrosecondCount()^(ulong)ChartID()));
   g_clock.Init();
   //--- a new EA instance: a new epoch, seq from 1, no engine yet
   g_epoch=DcNewEpoch();
   g_out_seq=0;
   g_engine_epoch=0;
   g_handshaked=false;
   g_had_session=false;
   g_retired_n=0;
   g_in.Reset();
   g_hb_ms=InpHeartbeatMs;
   g_missed=3;
   g_engine_magic=0;
   g_engine_lost=false;
   g_outbox_n=0;
   g_last_heard_us=GetMicrosecondCount();
   //--- the idempotency table: file, then the terminal's own record of the bridge's orders
   g_broker.Init(InpDeviationPoints,InpHistoryDays);
   string path=InpStateFile;
   if(path=="")
     {
      FolderCreate("DynamicCore");
      path="DynamicCore\\orders_"+IntegerToString(AccountInfoInteger(ACCOUNT_LOGIN))+"_"+IntegerToString(InpMagic)+".txt";
     }
   if(!g_table.Open(path,InpMaxOrders))
      Print("DynamicCoreEA: the order table file could not be read: relying on the terminal's history");
   int adopted=g_broker.Adopt(g_table,InpMagic,g_clock.Now());
   if(adopted>0)
      PrintFormat("DynamicCoreEA: %d bridge orders adopted from the terminal's orders and history",adopted);
   ResolveUnknownOutcomes();
   g_table.Compact();
   //--- the socket
   g_ctx=new Context("dynamic_core_ea");
   g_ctx.setBlocky(false);
   g_sock=new Socket(g_ctx,ZMQ_DEALER);
   if(!g_sock.valid())
     {
      PrintFormat("DynamicCoreEA: cannot create a DEALER socket: %s",Zmq::errorMessage(Zmq::errorNumber()));
      CloseSocket();
      return(INIT_FAILED);
     }
   g_sock.setLinger(0);
   g_sock.setSendHighWaterMark(10000);
   g_sock.setReceiveHighWaterMark(10000);
   g_sock.setMaxMessageSize(1048576);
   g_sock.setReconnectInterval(100);
   g_sock.setReconnectIntervalMax(2000);
   if(!g_sock.connect(InpEndpoint))
     {
      PrintFormat("DynamicCoreEA: cannot connect to %s: %s",InpEndpoint,Zmq::errorMessage(Zmq::errorNumber()));
      CloseSocket();
      return(INIT_FAILED);
     }
   if(!EventSetMillisecondTimer(InpTimerMs))
     {
      Print("DynamicCoreEA: cannot start the timer");
      CloseSocket();
      return(INIT_FAILED);
     }
   PrintFormat("DynamicCoreEA: epoch %I64d, %d orders remembered, connecting to %s",g_epoch,g_table.Count(),InpEndpoint);
   SendHello();
   g_next_hello_us=GetMicrosecondCount()+(ulong)g_hb_ms*1000;
   return(INIT_SUCCEEDED);
  }
//+------------------------------------------------------------------+
void OnDeinit(const int reason)
  {
   EventKillTimer();
   CloseSocket();
   g_table.Close();
   PrintFormat("DynamicCoreEA: stopped (reason %d): orders %I64d, duplicates %I64d, expired %I64d, submitted %I64d, "
               "cancels %I64d, queries %I64d, flattens %I64d, refused frames %I64d, send failures %I64d, "
               "gaps %I64d, reordered %I64d, duplicate messages %I64d",
               reason,g_cnt_orders,g_cnt_duplicates,g_cnt_expired,g_cnt_submits,g_cnt_cancels,g_cnt_queries,
               g_cnt_flattens,g_cnt_rejects,g_cnt_send_failures,g_in.gaps,g_in.reordered,g_in.duplicates);
  }
//+------------------------------------------------------------------+
void OnTimer(void)
  {
   g_clock.Tick();
   Poll();
   Housekeeping();
  }
//+------------------------------------------------------------------+
void OnTick(void)
  {
   g_clock.Tick();
   Poll();
  }
//+------------------------------------------------------------------+
//| Fills, cancellations and expiries: follow resting orders at once   |
//+------------------------------------------------------------------+
void OnTradeTransaction(const MqlTradeTransaction &trans,const MqlTradeRequest &request,const MqlTradeResult &result)
  {
   if(trans.type==TRADE_TRANSACTION_DEAL_ADD || trans.type==TRADE_TRANSACTION_HISTORY_ADD ||
      trans.type==TRADE_TRANSACTION_ORDER_DELETE || trans.type==TRADE_TRANSACTION_ORDER_UPDATE)
      g_dirty=true;
  }
//+------------------------------------------------------------------+
