//+------------------------------------------------------------------+
//| Protocol.mqh - the dynamic_core MT5 bridge protocol, version 1     |
//|                                                                    |
//| The EA's half of docs/mt5-bridge.md: what the engine sends is read |
//| by DcDecode (one DcRead<Message> per type, with the same bounds as |
//| the engine's schemas in dynamic_core.bridges.mt5.protocol), what   |
//| the EA sends is written by one DcWrite<Message> per type.          |
//| tests/test_mql5_source.py checks both against the Python schemas.  |
//+------------------------------------------------------------------+
#ifndef DYNAMIC_CORE_PROTOCOL_MQH
#define DYNAMIC_CORE_PROTOCOL_MQH

#include "Json.mqh"

#define DC_PROTOCOL_VERSION 1
#define DC_MAX_FRAME        65536      // bytes; larger frames are refused unread (oversized)
#define DC_MAX_ID           24         // longest client_order_id
#define DC_I63              LONG_MAX   // 2^63-1: the largest integer on the wire
#define DC_ID_CHARS         "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.:-"

//--- engine -> EA message types
#define DC_MSG_NONE            0
#define DC_MSG_HELLO           1
#define DC_MSG_ORDER           2
#define DC_MSG_CANCEL          3
#define DC_MSG_HEARTBEAT       4
#define DC_MSG_POSITIONS_QUERY 5
#define DC_MSG_FLATTEN         6
#define DC_MSG_ERROR           7

//--- fields of every message
struct DcHeader
  {
   long              v;
   long              epoch;
   long              seq;
   long              ts;
  };
//--- what the sender of a message stamps on it
struct DcStamp
  {
   long              epoch;
   long              seq;
   long              ts;
  };
//--- engine -> EA bodies
struct DcEngineHello
  {
   long              peer_epoch;
   long              heartbeat_ms;
   long              missed;
   long              magic;
  };
struct DcOrder
  {
   string            client_order_id;
   string            symbol;
   string            side;
   string            order_type;
   double            volume;
   double            price;
   double            sl;
   double            tp;
   long              valid_until;
   string            plan_id;
   long              magic;
   string            comment;
   long              attempt;
  };
struct DcCancel
  {
   string            client_order_id;
   string            reason;
  };
struct DcHeartbeat
  {
   long              recv_seq;
  };
struct DcPositionsQuery
  {
   long              query_id;
   long              magic;
  };
struct DcFlatten
  {
   long              query_id;
   long              magic;
   string            reason;
  };
struct DcError
  {
   string            reason;
   string            detail;
   long              ref_seq;
  };
//--- one decoded engine message: its type, header and the body of that type
struct DcEngineMessage
  {
   int               type;
   DcHeader          h;
   DcEngineHello     hello;
   DcOrder           order;
   DcCancel          cancel;
   DcHeartbeat       heartbeat;
   DcPositionsQuery  query;
   DcFlatten         flatten;
   DcError           error;
  };
//--- one open position, as the EA reports it
struct DcPositionInfo
  {
   string            symbol;
   long              ticket;
   string            side;
   double            volume;
   double            price_open;
   double            sl;
   double            tp;
   long              magic;
   string            comment;
   string            client_order_id;
   double            profit;
  };

//+------------------------------------------------------------------+
//| Engine -> EA: readers                                              |
//+------------------------------------------------------------------+
bool DcReadHeader(CDcJson &j,DcHeader &h)
  {
   j.GetVersion("v",DC_PROTOCOL_VERSION,h.v);
   j.GetInt("epoch",1,DC_I63,h.epoch);
   j.GetInt("seq",1,DC_I63,h.seq);
   j.GetInt("ts",0,DC_I63,h.ts);
   return(!j.Failed());
  }
//+------------------------------------------------------------------+
bool DcReadEngineHello(CDcJson &j,DcEngineHello &m)
  {
   j.GetInt("peer_epoch",0,DC_I63,m.peer_epoch);
   j.GetInt("heartbeat_ms",1,3600000,m.heartbeat_ms);
   j.GetInt("missed",1,1000,m.missed);
   j.GetInt("magic",0,DC_I63,m.magic);
   return(!j.Failed());
  }
//+------------------------------------------------------------------+
bool DcReadOrder(CDcJson &j,DcOrder &m)
  {
   j.GetId("client_order_id",DC_MAX_ID,m.client_order_id);
   j.GetStr("symbol",1,32,m.symbol);
   j.GetEnum("side","buy|sell",m.side);
   j.GetEnum("order_type","market|limit|stop",m.order_type);
   j.GetDbl("volume",0.0,1e9,true,m.volume);
   j.GetDbl("price",0.0,1e12,false,m.price);
   j.GetDbl("sl",0.0,1e12,false,m.sl);
   j.GetDbl("tp",0.0,1e12,false,m.tp);
   j.GetInt("valid_until",0,DC_I63,m.valid_until);
   j.GetStr("plan_id",0,256,m.plan_id);
   j.GetInt("magic",0,DC_I63,m.magic);
   j.GetStr("comment",0,31,m.comment);
   j.GetInt("attempt",0,1000000,m.attempt);
   return(!j.Failed());
  }
//+------------------------------------------------------------------+
bool DcReadCancel(CDcJson &j,DcCancel &m)
  {
   j.GetId("client_order_id",DC_MAX_ID,m.client_order_id);
   j.GetStr("reason",0,256,m.reason);
   return(!j.Failed());
  }
//+------------------------------------------------------------------+
bool DcReadHeartbeat(CDcJson &j,DcHeartbeat &m)
  {
   j.GetInt("recv_seq",0,DC_I63,m.recv_seq);
   return(!j.Failed());
  }
//+------------------------------------------------------------------+
bool DcReadPositionsQuery(CDcJson &j,DcPositionsQuery &m)
  {
   j.GetInt("query_id",1,DC_I63,m.query_id);
   j.GetInt("magic",0,DC_I63,m.magic);
   return(!j.Failed());
  }
//+------------------------------------------------------------------+
bool DcReadFlatten(CDcJson &j,DcFlatten &m)
  {
   j.GetInt("query_id",1,DC_I63,m.query_id);
   j.GetInt("magic",0,DC_I63,m.magic);
   j.GetStr("reason",0,256,m.reason);
   return(!j.Failed());
  }
//+------------------------------------------------------------------+
bool DcReadError(CDcJson &j,DcError &m)
  {
   j.GetStr("reason",0,64,m.reason);
   j.GetStr("detail",0,256,m.detail);
   j.GetInt("ref_seq",0,DC_I63,m.ref_seq);
   return(!j.Failed());
  }
//+------------------------------------------------------------------+
//| Decode one engine frame (already bounded by DC_MAX_FRAME).         |
//| false: reason/detail say why (a protocol error reason); ref_seq is |
//| the frame's seq when it could be read; is_error is true when the   |
//| frame says it is an "error" (never answered with an error).        |
//+------------------------------------------------------------------+
bool DcDecode(CDcJson &j,const uchar &buf[],const int len,DcEngineMessage &m,
              string &reason,string &detail,long &ref_seq,bool &is_error)
  {
   m.type=DC_MSG_NONE;
   reason="";
   detail="";
   ref_seq=0;
   is_error=false;
   if(len>DC_MAX_FRAME)
     {
      reason="oversized";
      detail=IntegerToString(len)+" bytes > max_frame "+IntegerToString(DC_MAX_FRAME);
      return(false);
     }
   if(!j.Parse(buf,len))
     {
      reason=j.Reason();
      detail=j.Detail();
      return(false);
     }
   long seq=0;
   if(j.PeekInt("seq",seq) && seq>=1)
      ref_seq=seq;
   string peek="";
   if(j.PeekStr("type",peek) && peek=="error")
      is_error=true;
   string tag="";
   if(!j.GetTag(tag))
     {
      reason=j.Reason();
      detail=j.Detail();
      return(false);
     }
   bool known=true;
   if(tag=="hello")
     {
      m.type=DC_MSG_HELLO;
      DcReadHeader(j,m.h);
      DcReadEngineHello(j,m.hello);
     }
   else
      if(tag=="order")
        {
         m.type=DC_MSG_ORDER;
         DcReadHeader(j,m.h);
         DcReadOrder(j,m.order);
        }
      else
         if(tag=="cancel")
           {
            m.type=DC_MSG_CANCEL;
            DcReadHeader(j,m.h);
            DcReadCancel(j,m.cancel);
           }
         else
            if(tag=="heartbeat")
              {
               m.type=DC_MSG_HEARTBEAT;
               DcReadHeader(j,m.h);
               DcReadHeartbeat(j,m.heartbeat);
              }
            else
               if(tag=="positions_query")
                 {
                  m.type=DC_MSG_POSITIONS_QUERY;
                  DcReadHeader(j,m.h);
                  DcReadPositionsQuery(j,m.query);
                 }
               else
                  if(tag=="flatten")
                    {
                     m.type=DC_MSG_FLATTEN;
                     DcReadHeader(j,m.h);
                     DcReadFlatten(j,m.flatten);
                    }
                  else
                     if(tag=="error")
                       {
                        m.type=DC_MSG_ERROR;
                        DcReadHeader(j,m.h);
                        DcReadError(j,m.error);
                       }
                     else
                        known=false;
   if(!known)
     {
      //--- includes the EA's own types (ack, exec_report, ...): the engine never sends them
      m.type=DC_MSG_NONE;
      reason="unknown_tag";
      detail="Invalid value '"+DcClip(tag,32)+"' - at `$.type`";
      return(false);
     }
   if(!j.Finish())
     {
      m.type=DC_MSG_NONE;
      reason=j.Reason();
      detail=j.Detail();
      return(false);
     }
   return(true);
  }

//+------------------------------------------------------------------+
//| EA -> engine: writers                                              |
//+------------------------------------------------------------------+
void DcWriteHeader(CDcJsonWriter &w,const string tag,const DcStamp &s)
  {
   w.Str("type",tag,32);
   w.Int("v",DC_PROTOCOL_VERSION);
   w.Int("epoch",s.epoch);
   w.Int("seq",s.seq);
   w.Int("ts",s.ts);
  }
//+------------------------------------------------------------------+
string DcWriteTerminalHello(const DcStamp &s,const long login,const string server,const bool resumed,
                            const long peer_epoch,const string build)
  {
   CDcJsonWriter w;
   DcWriteHeader(w,"hello",s);
   w.Int("login",login);
   w.Str("server",server,64);
   w.Bool("resumed",resumed);
   w.Int("peer_epoch",peer_epoch);
   w.Str("build",build,64);
   return(w.End());
  }
//+------------------------------------------------------------------+
string DcWriteAck(const DcStamp &s,const string client_order_id,const long order_seq,const bool accepted,
                  const string reason,const bool duplicate,const long ticket)
  {
   CDcJsonWriter w;
   DcWriteHeader(w,"ack",s);
   w.Str("client_order_id",client_order_id,DC_MAX_ID);
   w.Int("order_seq",order_seq);
   w.Bool("accepted",accepted);
   w.Str("reason",reason,256);
   w.Bool("duplicate",duplicate);
   w.Int("ticket",ticket);
   return(w.End());
  }
//+------------------------------------------------------------------+
string DcWriteExecReport(const DcStamp &s,const string client_order_id,const string status,const string symbol,
                         const string side,const long ticket,const double price,const double volume,
                         const double commission,const long fill_ts,const string reason)
  {
   CDcJsonWriter w;
   DcWriteHeader(w,"exec_report",s);
   w.Str("client_order_id",client_order_id,DC_MAX_ID);
   w.Str("status",status,16);
   w.Str("symbol",symbol,32);
   w.Str("side",side,4);
   w.Int("ticket",ticket);
   w.Dbl("price",price);
   w.Dbl("volume",volume);
   w.Dbl("commission",commission);
   w.Int("fill_ts",fill_ts);
   w.Str("reason",reason,256);
   return(w.End());
  }
//+------------------------------------------------------------------+
string DcWriteHeartbeat(const DcStamp &s,const long recv_seq)
  {
   CDcJsonWriter w;
   DcWriteHeader(w,"heartbeat",s);
   w.Int("recv_seq",recv_seq);
   return(w.End());
  }
//+------------------------------------------------------------------+
string DcWritePosition(const DcStamp &s,const long query_id,const long snapshot,const long index,
                       const DcPositionInfo &p)
  {
   CDcJsonWriter w;
   DcWriteHeader(w,"position",s);
   w.Int("query_id",query_id);
   w.Int("snapshot",snapshot);
   w.Int("index",index);
   w.Str("symbol",p.symbol,32);
   w.Int("ticket",p.ticket);
   w.Str("side",p.side,4);
   w.Dbl("volume",p.volume);
   w.Dbl("price_open",p.price_open);
   w.Dbl("sl",p.sl);
   w.Dbl("tp",p.tp);
   w.Int("magic",p.magic);
   w.Str("comment",p.comment,31);
   w.Str("client_order_id",p.client_order_id,DC_MAX_ID);
   w.Dbl("profit",p.profit);
   return(w.End());
  }
//+------------------------------------------------------------------+
string DcWritePositionsEnd(const DcStamp &s,const long query_id,const long snapshot,const long count)
  {
   CDcJsonWriter w;
   DcWriteHeader(w,"positions_end",s);
   w.Int("query_id",query_id);
   w.Int("snapshot",snapshot);
   w.Int("count",count);
   return(w.End());
  }
//+------------------------------------------------------------------+
string DcWriteError(const DcStamp &s,const string reason,const string detail,const long ref_seq)
  {
   CDcJsonWriter w;
   DcWriteHeader(w,"error",s);
   w.Str("reason",reason,64);
   w.Str("detail",detail,256);
   w.Int("ref_seq",ref_seq);
   return(w.End());
  }
#endif // DYNAMIC_CORE_PROTOCOL_MQH
//+------------------------------------------------------------------+
