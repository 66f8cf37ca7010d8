//+------------------------------------------------------------------+
//| Trading.mqh - the EA's side of the trade server for the bridge     |
//|                                                                    |
//| CDcBroker places, follows, cancels and flattens the bridge's       |
//| orders with CTrade, finds an order by its comment (= its           |
//| client_order_id) in the terminal's orders, positions and history,  |
//| and lists positions. Times from the trade server are converted to  |
//| ms UTC (the protocol's unit).                                      |
//+------------------------------------------------------------------+
#ifndef DYNAMIC_CORE_TRADING_MQH
#define DYNAMIC_CORE_TRADING_MQH

#include <Trade/Trade.mqh>
#include "Session.mqh"

#define DC_EPS 1e-9

class CDcBroker
  {
private:
   CTrade            m_trade;
   int               m_history_days;
   string            m_last_error;

   void              SelectHistory(void);
   bool              Aggregate(const ulong order_ticket,double &vol,double &vwap,double &comm,long &last_ms);
   void              ApplyFills(CDcOrderRec *rec,const double vol,const double vwap,const double comm,const long last_ms);
   void              FromOrderType(const long type,string &side,string &order_type) const;
   bool              FromHistoryOrder(const ulong ticket,CDcOrderRec *rec);
   void              FromActiveOrder(const ulong ticket,CDcOrderRec *rec);
   string            ResultText(void);

public:
                     CDcBroker(void) : m_history_days(7) {}
   void              Init(const int deviation_points,const int history_days);
   //--- trade server time minus UTC, seconds (rounded to 15 minutes)
   long              ServerOffsetSec(void) const;
   long              ServerMsToUtc(const long server_ms) const;
   //--- refuse before the ack: "" when the order can be tried
   string            Check(const DcOrder &o) const;
   //--- place an accepted order; sets status/ticket/fills on rec
   void              Place(CDcOrderRec *rec,const DcOrder &o,const long now_ms);
   //--- a placed/partial order: follow it; true when rec changed
   bool              Refresh(CDcOrderRec *rec,const long now_ms);
   //--- cancel a placed/partial order; true when rec changed
   bool              Cancel(CDcOrderRec *rec,const string reason,const long now_ms);
   //--- delete pending orders and close positions of magic (0: all); how many were acted on
   int               Flatten(const long magic);
   //--- find coid in the terminal (orders, positions, history): fills rec; false if absent
   bool              Lookup(const string coid,CDcOrderRec *rec);
   //--- add to the table every bridge order of the terminal it does not know (after a lost file)
   int               Adopt(CDcOrderTable &table,const long magic,const long now_ms);
   //--- open positions of magic (0: all); snapshot identifies the listed set
   int               Positions(const long magic,CDcOrderTable &table,DcPositionInfo &out[],long &snapshot);
  };
//+------------------------------------------------------------------+
void CDcBroker::Init(const int deviation_points,const int history_days)
  {
   m_history_days=MathMax(1,history_days);
   m_trade.SetDeviationInPoints((ulong)MathMax(0,deviation_points));
   m_trade.SetAsyncMode(false);
   m_trade.LogLevel(LOG_LEVEL_ERRORS);
  }
//+------------------------------------------------------------------+
long CDcBroker::ServerOffsetSec(void) const
  {
   long d=(long)TimeTradeServer()-(long)TimeGMT();
   return((long)MathRound((double)d/900.0)*900);
  }
//+------------------------------------------------------------------+
long CDcBroker::ServerMsToUtc(const long server_ms) const
  {
   if(server_ms<=0)
      return(0);
   long utc=server_ms-ServerOffsetSec()*1000;
   return(utc>0 ? utc : 0);
  }
//+------------------------------------------------------------------+
void CDcBroker::SelectHistory(void)
  {
   datetime now=TimeTradeServer();
   HistorySelect(now-(datetime)(m_history_days*86400),now+86400);
  }
//+------------------------------------------------------------------+
string CDcBroker::ResultText(void)
  {
   return(IntegerToString(m_trade.ResultRetcode())+" "+m_trade.ResultRetcodeDescription()+
          (m_trade.ResultComment()!="" ? " ("+m_trade.ResultComment()+")" : ""));
  }
//+------------------------------------------------------------------+
//| Deals of one order in the selected history: lots, average price,   |
//| commission, time of the last (ms UTC)                              |
//+------------------------------------------------------------------+
bool CDcBroker::Aggregate(const ulong order_ticket,double &vol,double &vwap,double &comm,long &last_ms)
  {
   vol=0.0;
   vwap=0.0;
   comm=0.0;
   last_ms=0;
   double pv=0.0;
   int n=HistoryDealsTotal();
   for(int i=0; i<n; i++)
     {
      ulong d=HistoryDealGetTicket(i);
      if(d==0 || (ulong)HistoryDealGetInteger(d,DEAL_ORDER)!=order_ticket)
         continue;
      double v=HistoryDealGetDouble(d,DEAL_VOLUME);
      vol+=v;
      pv+=v*HistoryDealGetDouble(d,DEAL_PRICE);
      comm+=HistoryDealGetDouble(d,DEAL_COMMISSION);
      long t=HistoryDealGetInteger(d,DEAL_TIME_MSC);
      if(t>last_ms)
         last_ms=t;
     }
   if(vol>DC_EPS)
      vwap=pv/vol;
   last_ms=ServerMsToUtc(last_ms);
   return(vol>DC_EPS);
  }
//+------------------------------------------------------------------+
//| Cumulative fills only grow (exec reports are cumulative)           |
//+------------------------------------------------------------------+
void CDcBroker::ApplyFills(CDcOrderRec *rec,const double vol,const double vwap,const double comm,const long last_ms)
  {
   if(vol+DC_EPS<rec.filled)
      return;
   rec.filled=NormalizeDouble(vol,8);
   rec.price=vwap;
   rec.commission=comm;
   if(last_ms>0)
      rec.fill_ts=last_ms;
  }
//+------------------------------------------------------------------+
void CDcBroker::FromOrderType(const long type,string &side,string &order_type) const
  {
   side=(type==ORDER_TYPE_BUY || type==ORDER_TYPE_BUY_LIMIT || type==ORDER_TYPE_BUY_STOP ||
         type==ORDER_TYPE_BUY_STOP_LIMIT) ? "buy" : "sell";
   if(type==ORDER_TYPE_BUY || type==ORDER_TYPE_SELL)
      order_type="market";
   else
      if(type==ORDER_TYPE_BUY_LIMIT || type==ORDER_TYPE_SELL_LIMIT)
         order_type="limit";
      else
         order_type="stop";
  }
//+------------------------------------------------------------------+
//| rec from an order of the selected history                          |
//+------------------------------------------------------------------+
bool CDcBroker::FromHistoryOrder(const ulong ticket,CDcOrderRec *rec)
  {
   long state=0;
   if(!HistoryOrderGetInteger(ticket,ORDER_STATE,state))
      return(false);
   rec.ticket=(long)ticket;
   rec.symbol=HistoryOrderGetString(ticket,ORDER_SYMBOL);
   FromOrderType(HistoryOrderGetInteger(ticket,ORDER_TYPE),rec.side,rec.order_type);
   rec.volume=HistoryOrderGetDouble(ticket,ORDER_VOLUME_INITIAL);
   rec.magic=HistoryOrderGetInteger(ticket,ORDER_MAGIC);
   rec.accepted=true;
   double vol,vwap,comm;
   long last;
   bool any=Aggregate(ticket,vol,vwap,comm,last);
   ApplyFills(rec,vol,vwap,comm,last);
   if(state==ORDER_STATE_FILLED)
     {
      rec.status="filled";
      if(!any)
        {
         //--- deals not in the selected window: the order's own numbers
         rec.filled=rec.volume-HistoryOrderGetDouble(ticket,ORDER_VOLUME_CURRENT);
         rec.price=HistoryOrderGetDouble(ticket,ORDER_PRICE_CURRENT);
         rec.fill_ts=ServerMsToUtc(HistoryOrderGetInteger(ticket,ORDER_TIME_DONE_MSC));
        }
     }
   else
      if(state==ORDER_STATE_CANCELED || state==ORDER_STATE_PARTIAL)
        {
         rec.status=any ? "filled" : "cancelled";
         rec.reason=any ? "cancelled after a partial fill" : "cancelled";
        }
      else
         if(state==ORDER_STATE_EXPIRED)
           {
            rec.status=any ? "filled" : "expired";
            rec.reason=any ? "expired after a partial fill" : "expired";
           }
         else
            if(state==ORDER_STATE_REJECTED)
              {
               rec.status="rejected";
               rec.reason="rejected by the trade server";
              }
            else
               rec.status="placed";   // still being processed: followed by Refresh
   return(true);
  }
//+------------------------------------------------------------------+
//| rec from an active (pending) order                                 |
//+------------------------------------------------------------------+
void CDcBroker::FromActiveOrder(const ulong ticket,CDcOrderRec *rec)
  {
   rec.ticket=(long)ticket;
   rec.symbol=OrderGetString(ORDER_SYMBOL);
   FromOrderType(OrderGetInteger(ORDER_TYPE),rec.side,rec.order_type);
   rec.volume=OrderGetDouble(ORDER_VOLUME_INITIAL);
   rec.magic=OrderGetInteger(ORDER_MAGIC);
   rec.accepted=true;
   double done=rec.volume-OrderGetDouble(ORDER_VOLUME_CURRENT);
   rec.status=(done>DC_EPS) ? "partial" : "placed";
   if(done>DC_EPS)
     {
      SelectHistory();
      double vol,vwap,comm;
      long last;
      if(Aggregate(ticket,vol,vwap,comm,last))
         ApplyFills(rec,vol,vwap,comm,last);
     }
  }
//+------------------------------------------------------------------+
string CDcBroker::Check(const DcOrder &o) const
  {
   if(!SymbolSelect(o.symbol,true))
      return("invalid_symbol");
   if(!TerminalInfoInteger(TERMINAL_TRADE_ALLOWED) || !MQLInfoInteger(MQL_TRADE_ALLOWED) ||
      !AccountInfoInteger(ACCOUNT_TRADE_ALLOWED) || !AccountInfoInteger(ACCOUNT_TRADE_EXPERT))
      return("trade_disabled");
   long mode=SymbolInfoInteger(o.symbol,SYMBOL_TRADE_MODE);
   if(mode==SYMBOL_TRADE_MODE_DISABLED || mode==SYMBOL_TRADE_MODE_CLOSEONLY)
      return("trade_disabled");
   if(mode==SYMBOL_TRADE_MODE_LONGONLY && o.side=="sell")
      return("trade_disabled");
   if(mode==SYMBOL_TRADE_MODE_SHORTONLY && o.side=="buy")
      return("trade_disabled");
   double vmin=SymbolInfoDouble(o.symbol,SYMBOL_VOLUME_MIN);
   double vmax=SymbolInfoDouble(o.symbol,SYMBOL_VOLUME_MAX);
   double step=SymbolInfoDouble(o.symbol,SYMBOL_VOLUME_STEP);
   if(o.volume<vmin-DC_EPS || (vmax>0.0 && o.volume>vmax+DC_EPS))
      return("invalid_volume");
   if(step>0.0)
     {
      double k=o.volume/step;
      if(MathAbs(k-MathRound(k))>1e-6)
         return("invalid_volume");
     }
   if(o.order_type!="market" && o.price<=0.0)
      return("invalid_price");
   return("");
  }
//+------------------------------------------------------------------+
void CDcBroker::Place(CDcOrderRec *rec,const DcOrder &o,const long now_ms)
  {
   string sym=o.symbol;
   int digits=(int)SymbolInfoInteger(sym,SYMBOL_DIGITS);
   double sl=(o.sl>0.0) ? NormalizeDouble(o.sl,digits) : 0.0;
   double tp=(o.tp>0.0) ? NormalizeDouble(o.tp,digits) : 0.0;
   m_trade.SetExpertMagicNumber((ulong)o.magic);
   m_trade.SetTypeFillingBySymbol(sym);
   bool ok;
   bool market=(o.order_type=="market");
   if(market)
     {
      if(o.side=="buy")
         ok=m_trade.Buy(o.volume,sym,0.0,sl,tp,rec.coid);
      else
         ok=m_trade.Sell(o.volume,sym,0.0,sl,tp,rec.coid);
     }
   else
     {
      ENUM_ORDER_TYPE type;
      if(o.order_type=="limit")
         type=(o.side=="buy") ? ORDER_TYPE_BUY_LIMIT : ORDER_TYPE_SELL_LIMIT;
      else
         type=(o.side=="buy") ? ORDER_TYPE_BUY_STOP : ORDER_TYPE_SELL_STOP;
      double price=NormalizeDouble(o.price,digits);
      //--- valid_until is the broker expiry where the symbol allows a specified time;
      //--- elsewhere (and as a backstop) Refresh deletes the order when it passes
      ENUM_ORDER_TYPE_TIME type_time=ORDER_TIME_GTC;
      datetime expiration=0;
      long exp_modes=SymbolInfoInteger(sym,SYMBOL_EXPIRATION_MODE);
      if(o.valid_until>0 && (exp_modes&SYMBOL_EXPIRATION_SPECIFIED)!=0)
        {
         type_time=ORDER_TIME_SPECIFIED;
         expiration=(datetime)((o.valid_until+999)/1000+ServerOffsetSec());
        }
      ok=m_trade.OrderOpen(sym,type,o.volume,0.0,price,sl,tp,type_time,expiration,rec.coid);
      if(!ok && type_time==ORDER_TIME_SPECIFIED && m_trade.ResultRetcode()==TRADE_RETCODE_INVALID_EXPIRATION)
         ok=m_trade.OrderOpen(sym,type,o.volume,0.0,price,sl,tp,ORDER_TIME_GTC,0,rec.coid);
     }
   uint rc=m_trade.ResultRetcode();
   if(ok && (rc==TRADE_RETCODE_DONE || rc==TRADE_RETCODE_DONE_PARTIAL || rc==TRADE_RETCODE_PLACED))
     {
      rec.ticket=(long)m_trade.ResultOrder();
      if(!market)
        {
         rec.status="placed";
         Refresh(rec,now_ms);   // a marketable limit may already have filled
         return;
        }
      double rvol=m_trade.ResultVolume();
      double rprice=m_trade.ResultPrice();
      SelectHistory();
      double vol,vwap,comm;
      long last;
      if(Aggregate((ulong)rec.ticket,vol,vwap,comm,last))
         ApplyFills(rec,vol,vwap,comm,last);
      else
         if(rvol>DC_EPS)
            ApplyFills(rec,rvol,rprice,0.0,now_ms);
      if(rec.filled<=DC_EPS)
        {
         rec.status="placed";    // accepted, execution pending (exchange execution): followed by Refresh
         return;
        }
      if(OrderSelect((ulong)rec.ticket))
         rec.status="partial";   // the rest still works (return filling)
      else
        {
         rec.status="filled";
         if(rec.filled+DC_EPS<o.volume)
            rec.reason="partial fill, the rest cancelled ("+ResultText()+")";
        }
      return;
     }
   //--- refused or failed: make sure nothing reached the server under this id before saying so
   string why=ResultText();
   if(Lookup(rec.coid,rec))
     {
      PrintFormat("DynamicCoreEA: %s: OrderSend said %s but the order exists (ticket %I64d)",rec.coid,why,rec.ticket);
      return;
     }
   rec.status="rejected";
   rec.reason=why;
  }
//+------------------------------------------------------------------+
bool CDcBroker::Refresh(CDcOrderRec *rec,const long now_ms)
  {
   if(rec.status!="placed" && rec.status!="partial")
      return(false);
   if(rec.ticket<=0)
      return(false);
   ulong t=(ulong)rec.ticket;
   string before_status=rec.status;
   double before_filled=rec.filled;
   if(OrderSelect(t))
     {
      double done=OrderGetDouble(ORDER_VOLUME_INITIAL)-OrderGetDouble(ORDER_VOLUME_CURRENT);
      if(done>rec.filled+DC_EPS)
        {
         SelectHistory();
         double vol,vwap,comm;
         long last;
         if(Aggregate(t,vol,vwap,comm,last))
            ApplyFills(rec,vol,vwap,comm,last);
         rec.status="partial";
        }
      //--- the EA's own expiry: a broker without specified-time orders, or one that is late
      if(rec.valid_until>0 && now_ms>=rec.valid_until+1000)
        {
         if(m_trade.OrderDelete(t))
           {
            SelectHistory();
            double vol,vwap,comm;
            long last;
            if(Aggregate(t,vol,vwap,comm,last))
               ApplyFills(rec,vol,vwap,comm,last);
            rec.status=(rec.filled>DC_EPS) ? "filled" : "expired";
            rec.reason=(rec.filled>DC_EPS) ? "expired after a partial fill" : "expired";
           }
        }
      return(rec.status!=before_status || rec.filled>before_filled+DC_EPS);
     }
   SelectHistory();
   CDcOrderRec tmp;
   if(!FromHistoryOrder(t,GetPointer(tmp)))
      return(false);   // not in the history yet: next time
   if(tmp.status=="placed")
      return(false);
   ApplyFills(rec,tmp.filled,tmp.price,tmp.commission,tmp.fill_ts);
   rec.status=tmp.status;
   if(tmp.reason!="" && rec.reason=="")
      rec.reason=tmp.reason;
   return(rec.status!=before_status || rec.filled>before_filled+DC_EPS);
  }
//+------------------------------------------------------------------+
bool CDcBroker::Cancel(CDcOrderRec *rec,const string reason,const long now_ms)
  {
   if(rec.status!="placed" && rec.status!="partial")
      return(false);
   ulong t=(ulong)rec.ticket;
   if(t>0 && OrderSelect(t) && m_trade.OrderDelete(t))
     {
      SelectHistory();
      double vol,vwap,comm;
      long last;
      if(Aggregate(t,vol,vwap,comm,last))
         ApplyFills(rec,vol,vwap,comm,last);
      rec.status=(rec.filled>DC_EPS) ? "filled" : "cancelled";
      rec.reason=(reason!="") ? reason : "cancelled";
      return(true);
     }
   return(Refresh(rec,now_ms));   // already gone: report what happened to it
  }
//+------------------------------------------------------------------+
int CDcBroker::Flatten(const long magic)
  {
   int acted=0;
   for(int i=OrdersTotal()-1; i>=0; i--)
     {
      ulong t=OrderGetTicket(i);
      if(t==0 || (magic!=0 && OrderGetInteger(ORDER_MAGIC)!=magic))
         continue;
      if(m_trade.OrderDelete(t))
         acted++;
      else
         PrintFormat("DynamicCoreEA: flatten: cannot delete order %I64u: %s",t,ResultText());
     }
   for(int i=PositionsTotal()-1; i>=0; i--)
     {
      ulong t=PositionGetTicket(i);
      if(t==0 || (magic!=0 && PositionGetInteger(POSITION_MAGIC)!=magic))
         continue;
      m_trade.SetExpertMagicNumber((ulong)PositionGetInteger(POSITION_MAGIC));
      m_trade.SetTypeFillingBySymbol(PositionGetString(POSITION_SYMBOL));
      if(m_trade.PositionClose(t))
         acted++;
      else
         PrintFormat("DynamicCoreEA: flatten: cannot close position %I64u: %s",t,ResultText());
     }
   return(acted);
  }
//+------------------------------------------------------------------+
//| The order whose comment is coid: pending, open as a position, or   |
//| in the history (orders, then deals)                                |
//+------------------------------------------------------------------+
bool CDcBroker::Lookup(const string coid,CDcOrderRec *rec)
  {
   for(int i=OrdersTotal()-1; i>=0; i--)
     {
      ulong t=OrderGetTicket(i);
      if(t!=0 && OrderGetString(ORDER_COMMENT)==coid)
        {
         FromActiveOrder(t,rec);
         return(true);
        }
     }
   SelectHistory();
   int n=HistoryOrdersTotal();
   for(int i=n-1; i>=0; i--)
     {
      ulong t=HistoryOrderGetTicket(i);
      if(t!=0 && HistoryOrderGetString(t,ORDER_COMMENT)==coid && FromHistoryOrder(t,rec))
         return(true);
     }
   int m=HistoryDealsTotal();
   for(int i=m-1; i>=0; i--)
     {
      ulong d=HistoryDealGetTicket(i);
      if(d!=0 && HistoryDealGetString(d,DEAL_COMMENT)==coid)
        {
         ulong t=(ulong)HistoryDealGetInteger(d,DEAL_ORDER);
         if(FromHistoryOrder(t,rec))
            return(true);
         //--- the deal without its order: what the deals say
         rec.ticket=(long)t;
         rec.symbol=HistoryDealGetString(d,DEAL_SYMBOL);
         rec.side=(HistoryDealGetInteger(d,DEAL_TYPE)==DEAL_TYPE_BUY) ? "buy" : "sell";
         rec.order_type="market";
         rec.magic=HistoryDealGetInteger(d,DEAL_MAGIC);
         rec.accepted=true;
         double vol,vwap,comm;
         long last;
         Aggregate(t,vol,vwap,comm,last);
         ApplyFills(rec,vol,vwap,comm,last);
         rec.volume=rec.filled;
         rec.status="filled";
         return(true);
        }
     }
   //--- an open position whose opening order fell out of the history window
   for(int i=PositionsTotal()-1; i>=0; i--)
     {
      ulong t=PositionGetTicket(i);
      if(t!=0 && PositionGetString(POSITION_COMMENT)==coid)
        {
         rec.ticket=PositionGetInteger(POSITION_IDENTIFIER);
         rec.symbol=PositionGetString(POSITION_SYMBOL);
         rec.side=(PositionGetInteger(POSITION_TYPE)==POSITION_TYPE_BUY) ? "buy" : "sell";
         rec.order_type="market";
         rec.magic=PositionGetInteger(POSITION_MAGIC);
         rec.accepted=true;
         rec.volume=PositionGetDouble(POSITION_VOLUME);
         rec.filled=rec.volume;
         rec.price=PositionGetDouble(POSITION_PRICE_OPEN);
         rec.fill_ts=ServerMsToUtc(PositionGetInteger(POSITION_TIME_MSC));
         rec.status="filled";
         return(true);
        }
     }
   return(false);
  }
//+------------------------------------------------------------------+
int CDcBroker::Adopt(CDcOrderTable &table,const long magic,const long now_ms)
  {
   int added=0;
   for(int i=OrdersTotal()-1; i>=0; i--)
     {
      ulong t=OrderGetTicket(i);
      if(t==0)
         continue;
      string c=OrderGetString(ORDER_COMMENT);
      if(!DcIsValidId(c) || (magic!=0 && OrderGetInteger(ORDER_MAGIC)!=magic) || table.Find(c)!=NULL)
         continue;
      CDcOrderRec *rec=table.Create(c,now_ms);
      if(rec==NULL)
         break;
      FromActiveOrder(t,rec);
      table.Save(rec);
      added++;
     }
   SelectHistory();
   int n=HistoryOrdersTotal();
   for(int i=0; i<n; i++)
     {
      ulong t=HistoryOrderGetTicket(i);
      if(t==0)
         continue;
      string c=HistoryOrderGetString(t,ORDER_COMMENT);
      if(!DcIsValidId(c) || (magic!=0 && HistoryOrderGetInteger(t,ORDER_MAGIC)!=magic) || table.Find(c)!=NULL)
         continue;
      CDcOrderRec *rec=table.Create(c,now_ms);
      if(rec==NULL)
         break;
      if(!FromHistoryOrder(t,rec))
        {
         rec.status="rejected";
         rec.reason="unreadable history order";
        }
      table.Save(rec);
      added++;
     }
   return(added);
  }
//+------------------------------------------------------------------+
int CDcBroker::Positions(const long magic,CDcOrderTable &table,DcPositionInfo &out[],long &snapshot)
  {
   int n=0;
   ulong h=(ulong)0x0DC0FFEE;
   int total=PositionsTotal();
   ArrayResize(out,total);
   for(int i=0; i<total; i++)
     {
      ulong t=PositionGetTicket(i);
      if(t==0)
         continue;
      long pm=PositionGetInteger(POSITION_MAGIC);
      if(magic!=0 && pm!=magic)
         continue;
      //--- written in place: no structure copies
      out[n].symbol=PositionGetString(POSITION_SYMBOL);
      out[n].ticket=(long)t;
      out[n].side=(PositionGetInteger(POSITION_TYPE)==POSITION_TYPE_BUY) ? "buy" : "sell";
      out[n].volume=PositionGetDouble(POSITION_VOLUME);
      out[n].price_open=PositionGetDouble(POSITION_PRICE_OPEN);
      out[n].sl=MathMax(0.0,PositionGetDouble(POSITION_SL));
      out[n].tp=MathMax(0.0,PositionGetDouble(POSITION_TP));
      out[n].magic=(pm>0) ? pm : 0;
      out[n].comment=DcClip(PositionGetString(POSITION_COMMENT),31);
      out[n].profit=PositionGetDouble(POSITION_PROFIT);
      if(!MathIsValidNumber(out[n].profit))
         out[n].profit=0.0;
      CDcOrderRec *rec=table.FindByTicket(PositionGetInteger(POSITION_IDENTIFIER));
      if(rec!=NULL)
         out[n].client_order_id=rec.coid;
      else
         out[n].client_order_id=DcIsValidId(out[n].comment) ? out[n].comment : "";
      h=DcMix64(h^t);
      h=DcMix64(h^(ulong)MathRound(out[n].volume*1e8));
      h=DcMix64(h^(ulong)MathRound(out[n].price_open*1e8));
      h=DcMix64(h^(ulong)MathRound(out[n].sl*1e8));
      h=DcMix64(h^(ulong)MathRound(out[n].tp*1e8));
      n++;
     }
   ArrayResize(out,n);
   h=DcMix64(h^(ulong)n);
   snapshot=(long)(h&(ulong)LONG_MAX);
   return(n);
  }
#endif // DYNAMIC_CORE_TRADING_MQH
//+------------------------------------------------------------------+
