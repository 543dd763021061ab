// The applicant's routes (also open to staff, who may look at any invoice or payment).

import { invoicesView, paymentView, returnView } from "./applicant.js";
import type { View } from "./ui.js";

export function applicantRoutes(section?: string, id?: string, action?: string): View | null {
  if (section === "invoices" && id && action === "return") return returnView(id);
  if (section === "invoices" && !id) return invoicesView();
  if (section === "payments" && id) return paymentView(id);
  return null;
}
